//! A backend on raw TCP that records every byte it is sent, so a test sees exactly what the
//! gateway forwarded (nothing normalised away by an HTTP library on the way in).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Answers each complete request (Content-Length or chunked, as the gateway forwards them)
/// with `200 ok`, unless told to stay silent.
pub struct RawBackend {
    pub addr: std::net::SocketAddr,
    received: Arc<Mutex<Vec<u8>>>,
    connections: Arc<AtomicUsize>,
    silent: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where the message at the start of `buf` ends, if it is all there.
pub fn message_end(buf: &[u8]) -> Option<usize> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    if head.contains("transfer-encoding: chunked") {
        let rest = &buf[head_end..];
        let end = rest.windows(5).position(|w| w == b"0\r\n\r\n")?;
        return Some(head_end + end + 5);
    }
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    (buf.len() >= head_end + len).then_some(head_end + len)
}

impl RawBackend {
    pub async fn start() -> RawBackend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received: Arc<Mutex<Vec<u8>>> = Arc::default();
        let connections: Arc<AtomicUsize> = Arc::default();
        let silent: Arc<AtomicBool> = Arc::default();
        let (log, conns, quiet) = (
            Arc::clone(&received),
            Arc::clone(&connections),
            Arc::clone(&silent),
        );
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                conns.fetch_add(1, SeqCst);
                let (log, quiet) = (Arc::clone(&log), Arc::clone(&quiet));
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 8192];
                    loop {
                        let n = match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        log.lock().unwrap().extend_from_slice(&chunk[..n]);
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = message_end(&buf) {
                            buf.drain(..end);
                            if quiet.load(SeqCst) {
                                continue;
                            }
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if conn.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        RawBackend {
            addr,
            received,
            connections,
            silent,
            task,
        }
    }

    /// A backend that reads and records but never answers.
    pub async fn silent() -> RawBackend {
        let b = RawBackend::start().await;
        b.silent.store(true, SeqCst);
        b
    }

    pub fn received(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().unwrap()).into_owned()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(SeqCst)
    }

    /// How many times `text` (a request line, say `"GET /x HTTP/1.1"`) was received.
    pub fn count(&self, text: &str) -> usize {
        self.received().matches(text).count()
    }
}
