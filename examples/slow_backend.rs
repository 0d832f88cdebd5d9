//! A backend that answers every request after a delay, holding thousands of connections on
//! one thread: the slow mirror target of bench/run.py (it replaced a Python server whose
//! own CPU use distorted the figures on a 2-core machine). Loopback only.
//!
//! Usage: slow_backend PORT [DELAY_MS]   (default 1000)

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = args.get(1).and_then(|p| p.parse().ok()).unwrap_or(19104);
    let delay = Duration::from_millis(args.get(2).and_then(|d| d.parse().ok()).unwrap_or(1000));
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (mut conn, _) = listener.accept().await?;
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
                tokio::time::sleep(delay).await;
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
