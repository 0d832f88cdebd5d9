//! A raw HTTP/2 client (h2c with prior knowledge) that writes frames byte by byte, so a
//! test can send what RFC 9113 forbids: the `h2` crate refuses to send most malformed
//! requests. Header blocks are HPACK-encoded by the `loona-hpack` crate, names and values as
//! given (upper case, spaces, control bytes and all).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

/// Largest frame payload a peer must accept (SETTINGS_MAX_FRAME_SIZE's initial value).
const MAX_FRAME: usize = 16_384;

/// How a stream ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A response with this status (the stream's first non-informational HEADERS).
    Status(u16),
    /// RST_STREAM with this error code.
    Reset(u32),
    /// GOAWAY with this error code.
    GoAway(u32),
    /// The connection closed without a word.
    Closed,
}

impl Outcome {
    /// A refusal: a 4xx, a reset, a GOAWAY or a close; never an answer from upstream.
    pub fn refused(&self) -> bool {
        match self {
            Outcome::Status(s) => (400..500).contains(s),
            _ => true,
        }
    }
}

/// A request's header block, field by field, pseudo-headers included, in wire order.
pub type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// `GET` of `path` at `authority`, as a well-behaved client writes it.
pub fn get(authority: &str, path: &str) -> Fields {
    request("GET", authority, path)
}

pub fn request(method: &str, authority: &str, path: &str) -> Fields {
    vec![
        (b":method".to_vec(), method.as_bytes().to_vec()),
        (b":scheme".to_vec(), b"http".to_vec()),
        (b":authority".to_vec(), authority.as_bytes().to_vec()),
        (b":path".to_vec(), path.as_bytes().to_vec()),
    ]
}

pub struct H2Conn {
    stream: TcpStream,
    encoder: loona_hpack::Encoder<'static>,
    decoder: loona_hpack::Decoder<'static>,
    buf: Vec<u8>,
}

impl H2Conn {
    /// Connects, sends the preface and empty SETTINGS, and waits for the server's SETTINGS.
    pub async fn open(port: u16) -> H2Conn {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let mut conn = H2Conn {
            stream,
            encoder: loona_hpack::Encoder::new(),
            decoder: loona_hpack::Decoder::new(),
            buf: Vec::new(),
        };
        conn.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        conn.frame(SETTINGS, 0, 0, &[]).await;
        loop {
            match conn.next_frame().await {
                Some((SETTINGS, flags, _, _)) if flags & ACK == 0 => break,
                Some(_) => continue,
                None => panic!("the server closed the h2 connection during its preface"),
            }
        }
        conn
    }

    async fn write(&mut self, bytes: &[u8]) {
        // A server that already gave up on the connection may refuse the rest: what it
        // answered is read by `outcome`.
        let _ = self.stream.write_all(bytes).await;
    }

    /// Writes one frame.
    pub async fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        let mut f = Vec::with_capacity(9 + payload.len());
        f.extend_from_slice(&len.to_be_bytes()[1..]);
        f.push(kind);
        f.push(flags);
        f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        f.extend_from_slice(payload);
        self.write(&f).await;
    }

    /// The HPACK block of `fields`.
    pub fn block(&mut self, fields: &Fields) -> Vec<u8> {
        self.encoder
            .encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
    }

    /// Sends `fields` on `stream` as HEADERS, split into CONTINUATION frames when large.
    pub async fn headers(&mut self, stream: u32, fields: &Fields, end_stream: bool) {
        let block = self.block(fields);
        let mut pieces = block.chunks(MAX_FRAME).peekable();
        let first = pieces.next().unwrap_or(&[]);
        let end = if pieces.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        let es = if end_stream { END_STREAM } else { 0 };
        self.frame(HEADERS, end | es, stream, first).await;
        while let Some(piece) = pieces.next() {
            let end = if pieces.peek().is_none() {
                END_HEADERS
            } else {
                0
            };
            self.frame(CONTINUATION, end, stream, piece).await;
        }
    }

    pub async fn data(&mut self, stream: u32, data: &[u8], end_stream: bool) {
        let flags = if end_stream { END_STREAM } else { 0 };
        self.frame(DATA, flags, stream, data).await;
    }

    /// RST_STREAM with CANCEL (0x8), as a client that gave up sends it.
    pub async fn cancel(&mut self, stream: u32) {
        self.frame(RST_STREAM, 0, stream, &8u32.to_be_bytes()).await;
    }

    /// The next frame (type, flags, stream, payload), or `None` when the connection closed.
    async fn next_frame(&mut self) -> Option<(u8, u8, u32, Vec<u8>)> {
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let kind = self.buf[3];
                    let flags = self.buf[4];
                    let id =
                        u32::from_be_bytes([self.buf[5], self.buf[6], self.buf[7], self.buf[8]])
                            & 0x7fff_ffff;
                    let payload = self.buf[9..9 + len].to_vec();
                    self.buf.drain(..9 + len);
                    return Some((kind, flags, id, payload));
                }
            }
            let mut chunk = [0u8; 16384];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads frames until `stream` gets an answer, a reset, or the connection ends (at
    /// most 5 s). SETTINGS and PING are acknowledged on the way; every header block is
    /// decoded so the HPACK state stays in step.
    pub async fn outcome(&mut self, stream: u32) -> Outcome {
        let wait = tokio::time::timeout(Duration::from_secs(5), async {
            let mut block = Vec::new();
            loop {
                let Some((kind, flags, id, payload)) = self.next_frame().await else {
                    return Outcome::Closed;
                };
                match kind {
                    SETTINGS if flags & ACK == 0 => self.frame(SETTINGS, ACK, 0, &[]).await,
                    PING if flags & ACK == 0 => self.frame(PING, ACK, 0, &payload).await,
                    GOAWAY => {
                        let code = payload
                            .get(4..8)
                            .map_or(0, |c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                        return Outcome::GoAway(code);
                    }
                    RST_STREAM if id == stream => {
                        let code = payload
                            .get(..4)
                            .map_or(0, |c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                        return Outcome::Reset(code);
                    }
                    HEADERS | CONTINUATION => {
                        block.extend_from_slice(&payload);
                        if flags & END_HEADERS == 0 {
                            continue;
                        }
                        let fields = self
                            .decoder
                            .decode(&std::mem::take(&mut block))
                            .expect("the server's HPACK block decodes");
                        let status = fields
                            .iter()
                            .find(|(n, _)| n == b":status")
                            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok());
                        match status {
                            Some(s) if id == stream && s >= 200 => return Outcome::Status(s),
                            _ => continue,
                        }
                    }
                    _ => continue,
                }
            }
        });
        wait.await
            .unwrap_or_else(|_| panic!("no answer on h2 stream {stream} within 5 s"))
    }
}
