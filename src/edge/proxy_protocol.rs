//! The PROXY protocol (HAProxy's, v1 text and v2 binary) on listeners with
//! `proxy_protocol: true`: an L4 balancer in front sends a header naming the client before
//! anything else (before TLS). [`read`] takes exactly the header's bytes off the
//! connection (never a byte of what follows), within the head's deadline; the header is
//! parsed by the `ppp` crate. Its source address becomes the connection's peer address,
//! set on the socket's digest, so everything that asks Pingora for the client's address
//! gets it. A `LOCAL` header (the balancer's own health check) or an `UNKNOWN`/non-IP one
//! keeps the socket's address. A missing or malformed header closes the connection.

use std::net::SocketAddr;
use std::time::Duration;

use pingora_core::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora_core::protocols::{SocketDigest, Stream};
use ppp::{v1, v2, HeaderResult};
use tokio::io::{AsyncRead, AsyncReadExt};

/// v2's fixed signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, CRLF included (the protocol's own bound).
const V1_MAX: usize = 107;
/// The longest v2 header the gateway takes (16 bytes + addresses + TLVs).
const V2_MAX: usize = 16 + 1024;

/// Why a connection had no usable header.
#[derive(Debug, PartialEq, Eq)]
pub enum Malformed {
    /// Not a PROXY protocol header at all.
    NotProxy,
    /// Too long, or not well-formed.
    Invalid,
    /// Closed before sending anything (a balancer's TCP health check): not counted.
    Nothing,
    /// Closed or failed before the header was complete.
    Closed,
    /// Not complete within the deadline.
    Late,
}

/// The source address a header names: `None` for `LOCAL`, `UNKNOWN` or non-IP ones.
pub type ProxiedSource = Option<SocketAddr>;

/// Reads the header off `io`, byte-exact, and parses it.
pub async fn read_header<R: AsyncRead + Unpin>(io: &mut R) -> Result<ProxiedSource, Malformed> {
    let mut buf = Vec::with_capacity(64);
    let mut first = [0u8; 12];
    match io.read(&mut first[..1]).await {
        Ok(1) => {}
        _ => return Err(Malformed::Nothing),
    }
    io.read_exact(&mut first[1..])
        .await
        .map_err(|_| Malformed::Closed)?;
    buf.extend_from_slice(&first);
    if &first == V2_SIGNATURE {
        let mut fixed = [0u8; 4];
        io.read_exact(&mut fixed)
            .await
            .map_err(|_| Malformed::Closed)?;
        buf.extend_from_slice(&fixed);
        let len = u16::from_be_bytes([fixed[2], fixed[3]]) as usize;
        if 16 + len > V2_MAX {
            return Err(Malformed::Invalid);
        }
        let start = buf.len();
        buf.resize(start + len, 0);
        io.read_exact(&mut buf[start..])
            .await
            .map_err(|_| Malformed::Closed)?;
    } else if first.starts_with(b"PROXY ") {
        // v1 ends at its CRLF: read byte by byte so as to take nothing after it (the
        // stream is buffered below, so each read is a copy, not a system call).
        while !buf.ends_with(b"\r\n") {
            if buf.len() >= V1_MAX {
                return Err(Malformed::Invalid);
            }
            let mut b = [0u8; 1];
            io.read_exact(&mut b).await.map_err(|_| Malformed::Closed)?;
            buf.push(b[0]);
        }
    } else {
        return Err(Malformed::NotProxy);
    }
    parse(&buf)
}

/// The source address of a complete header.
pub fn parse(bytes: &[u8]) -> Result<ProxiedSource, Malformed> {
    match HeaderResult::parse(bytes) {
        HeaderResult::V1(Ok(h)) => Ok(match h.addresses {
            v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            v1::Addresses::Unknown => None,
        }),
        HeaderResult::V2(Ok(h)) => match h.command {
            v2::Command::Local => Ok(None),
            v2::Command::Proxy => Ok(match h.addresses {
                v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v2::Addresses::Unix(_) | v2::Addresses::Unspecified => None,
            }),
        },
        _ => Err(Malformed::Invalid),
    }
}

/// Reads the header of a new connection within `limit`, and makes its source the
/// connection's peer address.
pub async fn accept(stream: &mut Stream, limit: Duration) -> Result<(), Malformed> {
    let source = match tokio::time::timeout(limit, read_header(stream)).await {
        Ok(result) => result?,
        Err(_) => return Err(Malformed::Late),
    };
    if let Some(source) = source {
        let local = stream
            .get_socket_digest()
            .and_then(|d| d.local_addr().cloned());
        let digest = SocketDigest::from_raw_fd(stream.id());
        let _ = digest.peer_addr.set(Some(PingoraAddr::Inet(source)));
        if let Some(local) = local {
            let _ = digest.local_addr.set(Some(local));
        }
        stream.set_socket_digest(digest);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn v1_and_v2_headers_name_the_source_and_leave_the_rest() {
        let mut v1 = &b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 443\r\nGET / HTTP/1.1\r\n"[..];
        let src = read_header(&mut v1).await.unwrap();
        assert_eq!(src, Some("203.0.113.7:51000".parse().unwrap()));
        assert_eq!(v1, b"GET / HTTP/1.1\r\n");

        let mut v6 = &b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 443\r\nrest"[..];
        let src = read_header(&mut v6).await.unwrap();
        assert_eq!(src, Some("[2001:db8::7]:51000".parse().unwrap()));
        assert_eq!(v6, b"rest");

        let mut header = V2_SIGNATURE.to_vec();
        header.extend_from_slice(&[0x21, 0x11, 0, 12]);
        header.extend_from_slice(&[198, 51, 100, 9, 192, 0, 2, 1, 0xC3, 0x50, 0x01, 0xBB]);
        header.extend_from_slice(b"rest");
        let mut v2 = &header[..];
        let src = read_header(&mut v2).await.unwrap();
        assert_eq!(src, Some("198.51.100.9:50000".parse().unwrap()));
        assert_eq!(v2, b"rest");

        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(read_header(&mut &local[..]).await, Ok(None));
        let mut unknown = &b"PROXY UNKNOWN\r\n"[..];
        assert_eq!(read_header(&mut unknown).await, Ok(None));
    }

    #[tokio::test]
    async fn anything_else_is_refused() {
        let cases: [(&[u8], Malformed); 5] = [
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Malformed::NotProxy),
            (b"PROXY TCP4 1.2.3.4\r\n", Malformed::Invalid),
            (b"PROXY TCP4 203.0.113.7 192.0.2.1 51000", Malformed::Closed),
            (
                b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 443 and then a great deal more text \
                  that goes on past the hundred and seven bytes a v1 header may have\r\n",
                Malformed::Invalid,
            ),
            (b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff", Malformed::Invalid),
        ];
        assert_eq!(read_header(&mut &b""[..]).await, Err(Malformed::Nothing));
        for (input, expected) in cases {
            let mut r = input;
            assert_eq!(read_header(&mut r).await, Err(expected), "{input:?}");
        }
    }
}
