//! `fanout --health-check [ADDR]`: asks a running fanout's admin listener for `/health` and
//! exits 0 when it answers 2xx, 1 otherwise. It is the container image's `HEALTHCHECK`: an
//! image built `FROM scratch` has no curl, and the binary already in it can ask. Plain
//! blocking sockets with a bound on every step; no runtime is started.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Where the probe asks when no address is given: the admin address of the image's example.
pub const DEFAULT_ADDRESS: &str = "127.0.0.1:9091";
/// The bound on connecting, and on each write and read.
const STEP_TIMEOUT: Duration = Duration::from_secs(2);
/// The most of the answer read: its status line is all the probe needs.
const MAX_HEAD: usize = 1024;

/// Asks `address` (`IP:PORT` or `host:PORT`) for `GET /health`; `Ok` with the status line
/// when it is 2xx, `Err` saying what went wrong otherwise.
pub fn health(address: &str) -> Result<String, String> {
    let addr: SocketAddr = address
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {address}: {e}"))?
        .next()
        .ok_or_else(|| format!("{address} resolves to no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, STEP_TIMEOUT)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let io = |e: std::io::Error| format!("{addr}: {e}");
    stream.set_read_timeout(Some(STEP_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(STEP_TIMEOUT)).map_err(io)?;
    let request = format!("GET /health HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(io)?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < MAX_HEAD {
        match stream.read(&mut buf).map_err(io)? {
            0 => break,
            n => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or("").trim().to_string();
    match line.split_whitespace().nth(1) {
        Some(code) if line.starts_with("HTTP/") && code.starts_with('2') && code.len() == 3 => {
            Ok(line)
        }
        _ if line.is_empty() => Err(format!("{addr} closed without an answer")),
        _ => Err(format!("{addr} answered {line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A one-shot server that answers `answer` to the first connection.
    fn answering(answer: &'static str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf);
                let _ = s.write_all(answer.as_bytes());
            }
        });
        addr
    }

    #[test]
    fn a_2xx_is_healthy_and_anything_else_is_not() {
        let ok = answering("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}");
        assert_eq!(health(&ok), Ok("HTTP/1.1 200 OK".to_string()));
        let down = answering("HTTP/1.1 503 Service Unavailable\r\n\r\n");
        assert!(health(&down).unwrap_err().contains("503"));
        let silent = answering("");
        assert!(health(&silent).unwrap_err().contains("closed"));
    }

    #[test]
    fn nothing_listening_is_unhealthy() {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").to_string()
        };
        assert!(health(&addr).unwrap_err().contains("cannot connect"));
    }
}
