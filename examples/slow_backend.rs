//! A backend that answers every request after a delay, holding thousands of connections on
//! one thread: the slow mirror target of bench/run.py (it replaced a Python server whose
//! own CPU use distorted the figures on a 2-core machine). Loopback only.
//!
//! With SLOTS it is a service of fixed capacity (bench/capacity.py): at most SLOTS requests
//! are served at once, the others wait their turn in arrival order, as behind a server's
//! worker pool. With AFTER_S and NEW_DELAY_MS its delay changes that many seconds after
//! the first request (an upstream that slows down mid-run).
//!
//! Usage: slow_backend PORT [DELAY_MS [SLOTS [AFTER_S NEW_DELAY_MS]]]   (default 1000 ms,
//! SLOTS 0: no slot limit)

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).and_then(|v| v.parse::<u64>().ok());
    let port = arg(1).and_then(|p| u16::try_from(p).ok()).unwrap_or(19104);
    let delay_ms = Arc::new(AtomicU64::new(arg(2).unwrap_or(1000)));
    let slots = Arc::new(Semaphore::new(
        arg(3)
            .filter(|n| *n > 0)
            .map_or(Semaphore::MAX_PERMITS, |n| n as usize),
    ));
    let change = arg(4).zip(arg(5));
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let started = Arc::new(AtomicBool::new(false));
    loop {
        let (mut conn, _) = listener.accept().await?;
        let (delay_ms, slots) = (Arc::clone(&delay_ms), Arc::clone(&slots));
        let started = Arc::clone(&started);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut have = 0usize;
            loop {
                // One request: the head, then Content-Length bytes of body.
                let head_end = loop {
                    if let Some(i) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    if have == buf.len() {
                        return;
                    }
                    match conn.read(&mut buf[have..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => have += n,
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let mut body_left = length.saturating_sub(have - head_end);
                let mut rest = (have - head_end).saturating_sub(length);
                while body_left > 0 {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            rest = n.saturating_sub(body_left);
                            body_left = body_left.saturating_sub(n);
                        }
                    }
                }
                // Keep what followed (a pipelined request) at the front of the buffer.
                let start = have - rest;
                buf.copy_within(start..have, 0);
                have = rest;
                if let (false, Some((after, new_delay))) = (started.swap(true, Relaxed), change) {
                    let delay_ms = Arc::clone(&delay_ms);
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(after)).await;
                        delay_ms.store(new_delay, Relaxed);
                        eprintln!("slow_backend {port}: delay now {new_delay} ms");
                    });
                }
                let Ok(slot) = slots.acquire().await else {
                    return;
                };
                tokio::time::sleep(Duration::from_millis(delay_ms.load(Relaxed))).await;
                drop(slot);
                if conn
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }
}
