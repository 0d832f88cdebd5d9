//! The JSON access log: one line per request on stdout, written by a dedicated thread so a
//! slow or blocked stdout never stalls a worker. Workers hand a record to a bounded queue
//! with `try_send`; when the queue is full the line is dropped and counted
//! (`fanout_access_log_dropped_total`), never waited for. The writer works in batches every
//! 10 ms: it formats what is queued, writes it with one flush, and sleeps.
//!
//! The thread starts on the first record, i.e. after Pingora has daemonized (a thread
//! started before the fork would not survive it).

use std::io::Write;
use std::net::IpAddr;
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use prometheus::IntCounter;
use serde::Serialize;

use crate::limits::Budget;

/// Lines that may wait for the writer; beyond this they are dropped.
const QUEUE: usize = 64 * 1024;
/// Bytes those lines may hold (a record carries its path and Host, up to the head
/// limits): beyond this they are dropped too.
pub const QUEUE_BYTES: usize = 32 * 1024 * 1024;
/// The writer's pause between batches: the longest a line waits before it is written.
const PAUSE: std::time::Duration = std::time::Duration::from_millis(10);

/// One request, as logged.
#[derive(Debug, Serialize)]
pub struct Record {
    #[serde(serialize_with = "rfc3339")]
    pub ts: SystemTime,
    pub request_id: String,
    /// The W3C trace id the request carried or was given (`traceparent`).
    pub trace_id: String,
    pub client: Option<IpAddr>,
    /// Who `auth` found the client to be (user, key name, token subject); never the
    /// credential itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<Arc<str>>,
    pub method: String,
    /// `HTTP/1.1`, `HTTP/2` or `HTTP/1.0`; `+tls` after it over TLS.
    pub protocol: &'static str,
    pub host: Option<String>,
    pub path: String,
    pub status: u16,
    /// A gRPC answer's `grpc-status` (trailers, or trailers-only headers): a failed call
    /// answers HTTP 200 all the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
    pub route: Option<Arc<str>>,
    pub upstream: Option<Arc<str>>,
    pub backend: Option<Arc<str>>,
    /// On a cached route: what the cache did (`hit`, `miss`, `stale`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<&'static str>,
    pub duration_ms: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Record {
    /// The memory the record holds while queued.
    fn size(&self) -> usize {
        std::mem::size_of::<Record>()
            + self.request_id.len()
            + self.trace_id.len()
            + self.method.len()
            + self.host.as_ref().map_or(0, String::len)
            + self.path.len()
            + self.identity.as_ref().map_or(0, |i| i.len())
    }
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&timestamp(*t))
}

/// `t` as an RFC 3339 time in UTC, to the millisecond.
pub fn timestamp(t: SystemTime) -> String {
    let dt: chrono::DateTime<chrono::Utc> = t.into();
    dt.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub struct AccessLogger {
    sender: OnceLock<SyncSender<Record>>,
    bytes: Arc<Budget>,
    dropped: IntCounter,
}

impl AccessLogger {
    pub fn new(dropped: IntCounter) -> Self {
        AccessLogger {
            sender: OnceLock::new(),
            bytes: Arc::new(Budget::new(QUEUE_BYTES)),
            dropped,
        }
    }

    /// Queues a record for the writer; never blocks.
    pub fn log(&self, record: Record) {
        let sender = self.sender.get_or_init(|| {
            let (tx, rx) = mpsc::sync_channel(QUEUE);
            let bytes = Arc::clone(&self.bytes);
            let spawned = std::thread::Builder::new()
                .name("fanout-access-log".into())
                .spawn(move || write_forever(rx, std::io::stdout().lock(), &bytes));
            if let Err(e) = spawned {
                log::error!("cannot start the access log writer: {e}");
            }
            tx
        });
        let size = record.size();
        if !self.bytes.try_take(size) {
            self.dropped.inc();
            return;
        }
        match sender.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.bytes.give_back(size);
                self.dropped.inc()
            }
        }
    }
}

fn write_forever(rx: Receiver<Record>, out: impl Write, bytes: &Budget) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    loop {
        // Drain what is queued, write it in one go, then sleep: the writer is never parked
        // in `recv`, so a worker's `try_send` never has to wake it (a futex call and a
        // context switch per request otherwise). Lines wait at most one pause.
        let mut wrote = false;
        loop {
            match rx.try_recv() {
                Ok(record) => {
                    bytes.give_back(record.size());
                    if serde_json::to_writer(&mut out, &record).is_ok() {
                        let _ = out.write_all(b"\n");
                    }
                    wrote = true;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    let _ = out.flush();
                    return;
                }
            }
        }
        if wrote {
            let _ = out.flush();
        }
        std::thread::sleep(PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(status: u16, path: String) -> Record {
        Record {
            ts: SystemTime::UNIX_EPOCH,
            request_id: "r".into(),
            trace_id: "t".into(),
            client: Some("127.0.0.1".parse().unwrap()),
            identity: None,
            method: "GET".into(),
            protocol: "HTTP/1.1",
            host: None,
            path,
            status,
            grpc_status: None,
            route: Some("api".into()),
            upstream: None,
            backend: None,
            cache: None,
            duration_ms: 1.5,
            bytes_in: 0,
            bytes_out: 2,
        }
    }

    #[test]
    fn records_are_one_json_line_each() {
        let (tx, rx) = mpsc::sync_channel(4);
        let bytes = Budget::new(QUEUE_BYTES);
        for status in [200, 404] {
            let r = record(status, "/x".into());
            assert!(bytes.try_take(r.size()));
            tx.send(r).unwrap();
        }
        drop(tx);
        let mut out = Vec::new();
        write_forever(rx, &mut out, &bytes);
        assert_eq!(bytes.used(), 0, "the writer gives back what it wrote");
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(v["ts"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["status"], 404);
        assert_eq!(v["route"], "api");
    }
}

#[cfg(test)]
mod bound_tests {
    use super::*;

    /// A writer that cannot keep up (here: never runs) holds at most `QUEUE_BYTES` of
    /// lines, however long their paths: the rest are dropped and counted.
    #[test]
    fn a_stalled_writer_holds_bounded_bytes() {
        let dropped = IntCounter::new("d", "d").unwrap();
        let logger = AccessLogger::new(dropped.clone());
        let (tx, _rx) = mpsc::sync_channel(QUEUE);
        assert!(logger.sender.set(tx).is_ok());
        let long = "/p".repeat(4096);
        for _ in 0..10_000 {
            logger.log(Record {
                ts: SystemTime::UNIX_EPOCH,
                request_id: "r".into(),
                trace_id: "t".into(),
                client: None,
                identity: None,
                method: "GET".into(),
                protocol: "HTTP/1.1",
                host: None,
                path: long.clone(),
                status: 200,
                grpc_status: None,
                route: None,
                upstream: None,
                backend: None,
                cache: None,
                duration_ms: 0.0,
                bytes_in: 0,
                bytes_out: 0,
            });
        }
        assert!(logger.bytes.used() <= QUEUE_BYTES);
        assert!(dropped.get() > 0);
        let queued = 10_000 - dropped.get() as usize;
        assert!(queued * 8192 <= QUEUE_BYTES, "{queued} queued");
    }
}
