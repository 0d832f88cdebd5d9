//! [`DiskSpool`]: the spool as an append-only segment log in `spool.dir`.
//!
//! Each process appends the requests it accepts to a segment file of its own,
//! `<id>-<pid>.seg`, one frame per request (`length`, CRC-32, then [`super::spool::encode`]),
//! and starts a new segment past [`SEGMENT_BYTES`], closing the old one with a seal frame.
//! The 202 goes out once the frame is written and, by the `fsync` policy, synced: `group`
//! (the default) has one `fdatasync` cover every frame written while the previous one ran,
//! `always` syncs each frame on its own, `never` leaves it to the kernel.
//!
//! One process at a time delivers: the one holding the `lock` file's exclusive `flock`. It
//! reads every segment (its own, those left by earlier processes, and those an old process
//! still appends to while it drains after an upgrade: a segment is complete once sealed, or
//! once its writer is gone), and records each target's delivery in the segment's
//! `<id>-<pid>.ack` file (never synced: an ack lost in a crash means one more delivery, not
//! one less). A segment whose every request is done for every target, and that will not
//! grow, is deleted with its acks.
//!
//! What a crash can lose: a process crash (even `kill -9`) loses nothing under any policy,
//! since written frames are in the kernel's page cache; a machine crash or power loss loses
//! nothing that was answered 202 under `group` and `always`, and up to the kernel's
//! write-back delay (about 30 s) of accepted requests under `never`. A frame cut short by a
//! crash never got its 202 and is skipped.

use parking_lot::{Condvar, Mutex};
use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{watch, Notify};

use super::spool::{decode, encode, Accepted, Found, Key, PutError, Spool};
use crate::config::Fsync;

/// A segment past this size is sealed and a new one started.
pub const SEGMENT_BYTES: u64 = 8 * 1024 * 1024;
/// Frame header: payload length and CRC-32, little-endian.
const FRAME_HEAD: usize = 8;
/// The seal frame: length 0 and this in the CRC's place.
const SEAL: u32 = 0xffff_ffff;
/// An ack: the request's offset in its segment, and the target's index (u16; 2 bytes spare).
const ACK_BYTES: usize = 12;
/// Requests read back from disk are kept in memory for the deliverer up to this many
/// bytes per scan; beyond it they are read again when their turn comes.
const SCAN_KEEP: u64 = 32 * 1024 * 1024;

pub struct DiskSpool(Arc<Inner>);

struct Inner {
    dir: PathBuf,
    max: u64,
    fsync: Fsync,
    pid: u32,
    writer: Mutex<Writer>,
    /// Frames written by this process so far, and how many of them are synced.
    durable: watch::Sender<u64>,
    sync_wanted: (Mutex<bool>, Condvar),
    /// The group-commit thread is started by the first put (after Pingora's `-d` fork).
    syncer: std::sync::Once,
    bytes: AtomicU64,
    /// A put happened (the deliverer in this process looks at once).
    wake: Notify,
    /// The `lock` file, while this process holds the right to deliver.
    lock: Mutex<Option<File>>,
    reader: Mutex<Reader>,
}

struct Writer {
    /// The segment being appended to (`None` until the first put).
    segment: Option<(u64, Arc<File>)>,
    len: u64,
    written: u64,
    last_id: u64,
}

#[derive(Default)]
struct Reader {
    segments: BTreeMap<u64, Segment>,
}

struct Segment {
    stem: String,
    pid: u32,
    read_to: u64,
    /// No frame will be added: sealed, or its writer is gone.
    complete: bool,
    /// (request, target) pairs not done yet.
    pending: usize,
    acks: Option<File>,
}

impl DiskSpool {
    /// Opens (creating) the spool directory. Nothing is read yet: that is the deliverer's
    /// first [`Spool::found`], once it holds the lock.
    pub fn open(dir: &Path, max_size: u64, fsync: Fsync) -> io::Result<DiskSpool> {
        std::fs::create_dir_all(dir)?;
        let probe = dir.join(format!(".probe-{}", std::process::id()));
        File::create(&probe)?;
        std::fs::remove_file(&probe)?;
        let bytes = segment_files(dir)?
            .iter()
            .filter_map(|(_, _, path)| std::fs::metadata(path).ok())
            .map(|m| m.len())
            .sum();
        let inner = Arc::new(Inner {
            dir: dir.to_path_buf(),
            max: max_size,
            fsync,
            pid: std::process::id(),
            writer: Mutex::new(Writer {
                segment: None,
                len: 0,
                written: 0,
                last_id: 0,
            }),
            durable: watch::Sender::new(0),
            sync_wanted: (Mutex::new(false), Condvar::new()),
            syncer: std::sync::Once::new(),
            bytes: AtomicU64::new(bytes),
            wake: Notify::new(),
            lock: Mutex::new(None),
            reader: Mutex::default(),
        });
        Ok(DiskSpool(inner))
    }
}

/// `(id, pid, path)` of every segment file in `dir`, oldest first.
fn segment_files(dir: &Path) -> io::Result<Vec<(u64, u32, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "seg") {
            if let Some((id, pid)) = parse_stem(&path) {
                out.push((id, pid, path));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn parse_stem(path: &Path) -> Option<(u64, u32)> {
    let stem = path.file_stem()?.to_str()?;
    let (id, pid) = stem.split_once('-')?;
    Some((id.parse().ok()?, pid.parse().ok()?))
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(FRAME_HEAD + payload.len());
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

impl Inner {
    fn stem(&self, id: u64) -> String {
        format!("{id:020}-{}", self.pid)
    }

    /// Appends one frame to this process's segment (sealing and starting a new one past
    /// [`SEGMENT_BYTES`]); returns the frame's number, for the group commit.
    fn append(&self, w: &mut Writer, frame: &[u8]) -> io::Result<u64> {
        let full = w.len > 0 && w.len + frame.len() as u64 > SEGMENT_BYTES;
        if w.segment.is_none() || full {
            if let Some((_, file)) = &w.segment {
                (&**file).write_all(&[0, 0, 0, 0])?;
                (&**file).write_all(&SEAL.to_le_bytes())?;
                if self.fsync != Fsync::Never {
                    file.sync_data()?;
                }
            }
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            let id = now.max(w.last_id + 1);
            let path = self.dir.join(format!("{}.seg", self.stem(id)));
            let file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(path)?;
            w.segment = Some((id, Arc::new(file)));
            w.last_id = id;
            w.len = 0;
        }
        let Some((_, file)) = &w.segment else {
            return Err(io::Error::other("no segment"));
        };
        (&**file).write_all(frame)?;
        w.len += frame.len() as u64;
        w.written += 1;
        Ok(w.written)
    }

    /// The group commit: whenever frames were written since the last sync, one
    /// `fdatasync` covers them all, and their puts are told.
    fn group_commit(&self) {
        let (wanted, signal) = &self.sync_wanted;
        loop {
            {
                let mut w = wanted.lock();
                while !*w {
                    signal.wait(&mut w);
                }
                *w = false;
            }
            let (file, upto) = {
                let w = self.writer.lock();
                (w.segment.as_ref().map(|(_, f)| Arc::clone(f)), w.written)
            };
            if let Some(file) = file {
                if let Err(e) = file.sync_data() {
                    log::error!("spool: fdatasync failed: {e}");
                }
            }
            self.durable.send_if_modified(|d| {
                let newer = upto > *d;
                *d = (*d).max(upto);
                newer
            });
        }
    }

    /// Reads what was added to the spool since the last scan.
    fn scan(&self) -> io::Result<Vec<Found>> {
        let mut r = self.reader.lock();
        let mut found = Vec::new();
        let mut kept = 0u64;
        for (id, pid, path) in segment_files(&self.dir)? {
            let seg = match r.segments.entry(id) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    let stem = format!("{id:020}-{pid}");
                    e.insert(Segment {
                        stem,
                        pid,
                        read_to: 0,
                        complete: false,
                        pending: 0,
                        acks: None,
                    })
                }
            };
            if seg.complete {
                continue;
            }
            // A writer that is gone adds nothing: checked before reading, so nothing it
            // wrote last is missed.
            let writer_gone = seg.pid != self.pid && !alive(seg.pid);
            let acked = if seg.read_to == 0 {
                read_acks(&self.dir.join(format!("{}.ack", seg.stem)))
            } else {
                HashSet::new()
            };
            let mut file = File::open(&path)?;
            file.seek(SeekFrom::Start(seg.read_to))?;
            let mut data = Vec::new();
            file.read_to_end(&mut data)?;
            let mut at = 0usize;
            while data.len() - at >= FRAME_HEAD {
                let word =
                    |i: usize| u32::from_le_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
                let (len, crc) = (word(at), word(at + 4));
                if len == 0 && crc == SEAL {
                    seg.complete = true;
                    at += FRAME_HEAD;
                    break;
                }
                let end = at + FRAME_HEAD + len as usize;
                if end > data.len() {
                    break; // still being written, or cut short by a crash
                }
                let payload = &data[at + FRAME_HEAD..end];
                if crc32fast::hash(payload) != crc {
                    if writer_gone {
                        log::warn!(
                            "spool: {path:?} is damaged at byte {}; the rest of it is skipped",
                            seg.read_to + at as u64
                        );
                        seg.complete = true;
                    }
                    break; // a frame still being copied in
                }
                let offset = seg.read_to + at as u64;
                at = end;
                let Some(accepted) = decode(Bytes::copy_from_slice(payload)) else {
                    log::warn!(
                        "spool: {path:?} holds an unreadable request at byte {offset}; skipped"
                    );
                    continue;
                };
                let pending: Vec<u16> = (0..accepted.targets.len() as u16)
                    .filter(|t| !acked.contains(&(offset, *t)))
                    .collect();
                if pending.is_empty() {
                    continue;
                }
                let size = (FRAME_HEAD + payload.len()) as u64;
                kept += size;
                seg.pending += pending.len();
                found.push(Found {
                    key: Key {
                        log: 0,
                        segment: id,
                        offset,
                    },
                    pending,
                    size,
                    accepted: Arc::new(accepted),
                });
                if kept > SCAN_KEEP {
                    break;
                }
            }
            seg.read_to += at as u64;
            if writer_gone && at == data.len() {
                seg.complete = true;
            }
            if kept > SCAN_KEEP {
                break;
            }
        }
        // Segments whose every request is done, and that will not grow, go.
        let finished: Vec<u64> = r
            .segments
            .iter()
            .filter(|(_, s)| s.complete && s.pending == 0)
            .map(|(id, _)| *id)
            .collect();
        for id in finished {
            if let Some(seg) = r.segments.remove(&id) {
                self.delete(&seg);
            }
        }
        Ok(found)
    }

    /// Reads one request back from its segment.
    fn load(&self, key: Key) -> io::Result<Arc<Accepted>> {
        let stem = {
            let r = self.reader.lock();
            r.segments.get(&key.segment).map(|s| s.stem.clone())
        };
        let stem = stem.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "segment gone"))?;
        let mut file = File::open(self.dir.join(format!("{stem}.seg")))?;
        file.seek(SeekFrom::Start(key.offset))?;
        let mut head = [0u8; FRAME_HEAD];
        file.read_exact(&mut head)?;
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        let mut payload = vec![0u8; len];
        file.read_exact(&mut payload)?;
        if crc32fast::hash(&payload) != crc {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "damaged frame"));
        }
        decode(Bytes::from(payload))
            .map(Arc::new)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unreadable request"))
    }

    fn delete(&self, seg: &Segment) {
        let path = self.dir.join(format!("{}.seg", seg.stem));
        let size = std::fs::metadata(&path).map_or(0, |m| m.len());
        if std::fs::remove_file(&path).is_ok() {
            let _ = self
                .bytes
                .fetch_update(Relaxed, Relaxed, |b| Some(b.saturating_sub(size)));
        }
        let _ = std::fs::remove_file(self.dir.join(format!("{}.ack", seg.stem)));
    }

    fn done(&self, key: Key, target: u16) {
        let mut r = self.reader.lock();
        let Some(seg) = r.segments.get_mut(&key.segment) else {
            return;
        };
        let mut ack = [0u8; ACK_BYTES];
        ack[..8].copy_from_slice(&key.offset.to_le_bytes());
        ack[8..10].copy_from_slice(&target.to_le_bytes());
        if seg.acks.is_none() {
            let path = self.dir.join(format!("{}.ack", seg.stem));
            seg.acks = OpenOptions::new().create(true).append(true).open(path).ok();
        }
        if let Some(f) = &mut seg.acks {
            if let Err(e) = f.write_all(&ack) {
                log::warn!("spool: cannot record a delivery in {}.ack: {e}", seg.stem);
            }
        }
        seg.pending = seg.pending.saturating_sub(1);
        if seg.pending == 0 && seg.complete {
            if let Some(seg) = r.segments.remove(&key.segment) {
                self.delete(&seg);
            }
        }
    }
}

/// The (offset, target) pairs recorded done in an ack file.
fn read_acks(path: &Path) -> HashSet<(u64, u16)> {
    let Ok(data) = std::fs::read(path) else {
        return HashSet::new();
    };
    data.chunks_exact(ACK_BYTES)
        .map(|a| {
            let mut offset = [0u8; 8];
            offset.copy_from_slice(&a[..8]);
            let offset = u64::from_le_bytes(offset);
            (offset, u16::from_le_bytes([a[8], a[9]]))
        })
        .collect()
}

#[async_trait]
impl Spool for DiskSpool {
    async fn put(&self, a: Arc<Accepted>) -> Result<(), PutError> {
        let frame = frame(&encode(&a));
        let size = frame.len() as u64;
        let inner = &self.0;
        if inner.bytes.load(Relaxed) + size > inner.max {
            return Err(PutError::Full);
        }
        match inner.fsync {
            Fsync::Always => {
                let inner = Arc::clone(inner);
                tokio::task::spawn_blocking(move || {
                    let mut w = inner.writer.lock();
                    inner.append(&mut w, &frame)?;
                    match &w.segment {
                        Some((_, file)) => file.sync_data(),
                        None => Ok(()),
                    }
                })
                .await
                .map_err(|e| PutError::Io(io::Error::other(e)))?
                .map_err(PutError::Io)?;
            }
            Fsync::Group => {
                inner.syncer.call_once(|| {
                    let syncer = Arc::clone(inner);
                    let started = std::thread::Builder::new()
                        .name("fanout-spool-sync".into())
                        .spawn(move || syncer.group_commit());
                    if let Err(e) = started {
                        log::error!("spool: cannot start the group commit thread: {e}");
                    }
                });
                let n = inner
                    .append(&mut inner.writer.lock(), &frame)
                    .map_err(PutError::Io)?;
                let mut durable = inner.durable.subscribe();
                {
                    let (wanted, signal) = &inner.sync_wanted;
                    *wanted.lock() = true;
                    signal.notify_one();
                }
                let _ = durable.wait_for(|d| *d >= n).await;
            }
            Fsync::Never => {
                inner
                    .append(&mut inner.writer.lock(), &frame)
                    .map_err(PutError::Io)?;
            }
        }
        inner.bytes.fetch_add(size, Relaxed);
        inner.wake.notify_one();
        Ok(())
    }

    async fn claim(&self, stop: &mut watch::Receiver<bool>) -> bool {
        let path = self.0.dir.join("lock");
        let file = match OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) => {
                log::error!("spool: cannot open {path:?}: {e}; nothing is delivered");
                return false;
            }
        };
        let mut told = false;
        loop {
            match file.try_lock() {
                Ok(()) => {
                    *self.0.lock.lock() = Some(file);
                    return true;
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    if !told {
                        log::info!("spool: another process delivers from {:?}; waiting for it to hand over", self.0.dir);
                        told = true;
                    }
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    log::error!("spool: cannot lock {path:?}: {e}; nothing is delivered");
                    return false;
                }
            }
            if *stop.borrow() {
                return false;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = stop.changed() => {}
            }
        }
    }

    async fn found(&self, wait: Duration) -> Vec<Found> {
        let scan = |inner: Arc<Inner>| async move {
            tokio::task::spawn_blocking(move || inner.scan())
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)))
        };
        match scan(Arc::clone(&self.0)).await {
            Ok(found) if !found.is_empty() => return found,
            Ok(_) => {}
            Err(e) => log::error!("spool: cannot read {:?}: {e}", self.0.dir),
        }
        // Other processes' segments are looked at every 100 ms; this one's at once.
        let _ = tokio::time::timeout(wait.min(Duration::from_millis(100)), self.0.wake.notified())
            .await;
        scan(Arc::clone(&self.0)).await.unwrap_or_default()
    }

    async fn load(&self, key: Key) -> io::Result<Arc<Accepted>> {
        let inner = Arc::clone(&self.0);
        tokio::task::spawn_blocking(move || inner.load(key))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)))
    }

    fn done(&self, key: Key, target: u16) {
        self.0.done(key, target);
    }

    async fn release(&self) {
        self.0.lock.lock().take();
    }

    fn bytes(&self) -> u64 {
        self.0.bytes.load(Relaxed)
    }

    fn durable(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broadcast::spool::tests::sample;

    fn open(dir: &Path, fsync: Fsync, max: u64) -> io::Result<DiskSpool> {
        DiskSpool::open(dir, max, fsync)
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fanout-spool-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_outlive_the_spool_and_done_ones_are_forgotten() {
        for fsync in [Fsync::Group, Fsync::Always, Fsync::Never] {
            let dir = scratch(&format!("{fsync:?}"));
            let spool = open(&dir, fsync, 1 << 30).unwrap();
            for i in 0..10u8 {
                spool.put(Arc::new(sample(&[i; 100]))).await.unwrap();
            }
            let (_tx, mut rx) = watch::channel(false);
            assert!(spool.claim(&mut rx).await);
            let found = spool.found(Duration::from_millis(10)).await;
            assert_eq!(found.len(), 10);
            for f in &found[..4] {
                spool.done(f.key, 0);
                spool.done(f.key, 1);
            }
            spool.done(found[4].key, 1);
            spool.release().await;
            drop(spool);

            // The next process finds what is left: 6 requests, one of them for one target.
            let next = open(&dir, fsync, 1 << 30).unwrap();
            assert!(next.claim(&mut rx).await);
            let found = next.found(Duration::from_millis(10)).await;
            assert_eq!(found.len(), 6, "{fsync:?}");
            assert_eq!(found[0].pending, [0]);
            assert_eq!(found[0].accepted.body.as_ref(), &[4u8; 100]);
            assert!(found[1..].iter().all(|f| f.pending == [0, 1]));
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_process_delivers_at_a_time() {
        let dir = scratch("lock");
        let a = open(&dir, Fsync::Never, 1 << 30).unwrap();
        let b = open(&dir, Fsync::Never, 1 << 30).unwrap();
        let (tx, mut rx) = watch::channel(false);
        assert!(a.claim(&mut rx.clone()).await);
        let waiting = tokio::spawn(async move {
            let got = b.claim(&mut rx).await;
            (got, b)
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !waiting.is_finished(),
            "b must wait while a holds the spool"
        );
        a.release().await;
        let (got, _b) = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("b takes over once a lets go")
            .unwrap();
        assert!(got);
        drop(tx);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_spool_refuses_and_finished_segments_are_deleted() {
        let dir = scratch("full");
        let spool = open(&dir, Fsync::Never, 3 * 1024 * 1024).unwrap();
        let big = Arc::new(sample(&vec![7u8; 1024 * 1024]));
        for _ in 0..2 {
            spool.put(Arc::clone(&big)).await.expect("room");
        }
        assert!(matches!(
            spool.put(Arc::clone(&big)).await,
            Err(PutError::Full)
        ));
        // Everything delivered: nothing is handed out again.
        let (_tx, mut rx) = watch::channel(false);
        assert!(spool.claim(&mut rx).await);
        let mut all = spool.found(Duration::from_millis(10)).await;
        for f in all.drain(..) {
            spool.done(f.key, 0);
            spool.done(f.key, 1);
        }
        // The active segment stays (it may grow); its requests are all done.
        assert!(spool.bytes() > 0);
        assert!(spool.found(Duration::from_millis(10)).await.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_frame_cut_short_is_not_read() {
        let dir = scratch("torn");
        std::fs::create_dir_all(&dir).unwrap();
        let whole = frame(&encode(&sample(b"whole")));
        let torn = frame(&encode(&sample(b"torn")));
        let mut data = whole.clone();
        data.extend_from_slice(&torn[..torn.len() - 3]);
        // Written by a process that is gone (pid 0 never is a live writer here).
        std::fs::write(dir.join("00000000000000000001-999999999.seg"), &data).unwrap();
        let spool = open(&dir, Fsync::Never, 1 << 30).unwrap();
        let found = spool.0.scan().unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].accepted.body.as_ref(), b"whole");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
