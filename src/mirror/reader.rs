//! The reader of answers on a mirror lane: HTTP/1.1 answers arriving pipelined on one
//! connection, read one after the other with their bodies skipped, so that each copy's
//! status can be counted and the connection reused. It keeps no body and holds at most one
//! answer head ([`MAX_HEAD`]) of bytes; anything it cannot frame exactly (a bad length, a
//! bad chunk, an answer nobody asked for) ends the connection.

use bytes::{Buf, BytesMut};

/// Longest answer head (or trailer section) read before the connection is given up.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in an answer head.
const MAX_HEADERS: usize = 100;
/// Longest chunk-size line.
const MAX_CHUNK_LINE: usize = 1024;

/// What the reader made of the bytes so far.
#[derive(Debug, PartialEq)]
pub enum Parsed {
    NeedMore,
    /// A complete final answer; `close`: the mirror closes the connection after it.
    Answer {
        status: u16,
        close: bool,
    },
    Invalid,
}

/// The answers (status, close) the reader finds in `data` when it arrives in two pieces
/// split at `split`, and whether it ended on something invalid. For the fuzz target
/// (`fuzz/`): the result must not depend on where the bytes were split.
#[doc(hidden)]
pub fn read_all(data: &[u8], split: usize) -> (Vec<(u16, bool)>, bool) {
    let mut reader = Reader::default();
    let mut inb = BytesMut::new();
    let mut answers = Vec::new();
    let split = split.min(data.len());
    for piece in [&data[..split], &data[split..]] {
        inb.extend_from_slice(piece);
        loop {
            match reader.next(&mut inb, Some(false)) {
                Parsed::NeedMore => break,
                Parsed::Answer { status, close } => answers.push((status, close)),
                Parsed::Invalid => return (answers, true),
            }
        }
    }
    (answers, false)
}

/// Where the reader is within the answers.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum ReadState {
    #[default]
    Head,
    /// Body bytes left to skip.
    Length { left: u64, status: u16, close: bool },
    Chunked {
        at: ChunkAt,
        status: u16,
        close: bool,
    },
    /// A body that lasts until the connection closes.
    UntilClose { status: u16 },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ChunkAt {
    Size,
    Data(u64),
    DataEnd,
    Trailer,
}

/// Reads pipelined answers one after the other, skipping their bodies.
#[derive(Default)]
pub struct Reader {
    state: ReadState,
}

impl Reader {
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, ReadState::Head)
    }

    /// The connection closed: the status of the answer this completes, if it was one whose
    /// body lasts until the close.
    pub fn closed(&self) -> Option<u16> {
        match self.state {
            ReadState::UntilClose { status } => Some(status),
            _ => None,
        }
    }

    /// Consumes from `inb` up to the end of the next complete answer. `head`: whether the
    /// request it answers was a HEAD (`None`: no request is waiting).
    pub fn next(&mut self, inb: &mut BytesMut, head: Option<bool>) -> Parsed {
        loop {
            match self.state {
                ReadState::Head => {
                    if inb.is_empty() {
                        return Parsed::NeedMore;
                    }
                    let Some(head) = head else {
                        return Parsed::Invalid; // an answer nobody asked for
                    };
                    match parse_head(inb, head) {
                        Ok(Some((used, state))) => {
                            inb.advance(used);
                            self.state = state;
                        }
                        Ok(None) if inb.len() > MAX_HEAD => return Parsed::Invalid,
                        Ok(None) => return Parsed::NeedMore,
                        Err(()) => return Parsed::Invalid,
                    }
                }
                ReadState::Length {
                    left,
                    status,
                    close,
                } => {
                    let take = left.min(inb.len() as u64);
                    inb.advance(take as usize);
                    if take < left {
                        self.state = ReadState::Length {
                            left: left - take,
                            status,
                            close,
                        };
                        return Parsed::NeedMore;
                    }
                    self.state = ReadState::Head;
                    return Parsed::Answer { status, close };
                }
                ReadState::Chunked { at, status, close } => match skip_chunked(at, inb) {
                    Ok(Some(at)) => {
                        self.state = ReadState::Chunked { at, status, close };
                        return Parsed::NeedMore;
                    }
                    Ok(None) => {
                        self.state = ReadState::Head;
                        return Parsed::Answer { status, close };
                    }
                    Err(()) => return Parsed::Invalid,
                },
                ReadState::UntilClose { .. } => {
                    inb.clear();
                    return Parsed::NeedMore;
                }
            }
        }
    }
}

/// Parses one answer head: its length and what follows it. 1xx heads are consumed with a
/// `Head` state (the final answer follows).
fn parse_head(inb: &[u8], head_request: bool) -> Result<Option<(usize, ReadState)>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let used = match resp.parse(inb) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let status = resp.code.ok_or(())?;
    if status == 101 {
        return Err(()); // copies never ask to switch protocols
    }
    if (100..200).contains(&status) {
        return Ok(Some((used, ReadState::Head)));
    }
    let mut close = resp.version == Some(0);
    let mut length = None;
    let mut chunked = false;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    close = false;
                }
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = h.value.trim_ascii().ends_with(b"chunked");
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let n: u64 = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or(())?;
            if length.is_some_and(|l| l != n) {
                return Err(());
            }
            length = Some(n);
        }
    }
    let state = if head_request || status == 204 || status == 304 {
        ReadState::Length {
            left: 0,
            status,
            close,
        }
    } else if chunked {
        ReadState::Chunked {
            at: ChunkAt::Size,
            status,
            close,
        }
    } else if let Some(left) = length {
        ReadState::Length {
            left,
            status,
            close,
        }
    } else {
        ReadState::UntilClose { status }
    };
    Ok(Some((used, state)))
}

/// Skips chunked body bytes; `Ok(None)` at the end of the body, `Ok(Some(at))` when more
/// bytes are needed.
fn skip_chunked(mut at: ChunkAt, inb: &mut BytesMut) -> Result<Option<ChunkAt>, ()> {
    loop {
        match at {
            ChunkAt::Size => {
                // httparse's chunk-size grammar: hex digits only (no sign, no spaces
                // before them), then optional extensions, then CRLF.
                let (used, size) = match httparse::parse_chunk_size(inb) {
                    Ok(httparse::Status::Complete(found)) => found,
                    Ok(httparse::Status::Partial) if inb.len() > MAX_CHUNK_LINE => return Err(()),
                    Ok(httparse::Status::Partial) => return Ok(Some(at)),
                    Err(_) => return Err(()),
                };
                inb.advance(used);
                at = if size == 0 {
                    ChunkAt::Trailer
                } else {
                    ChunkAt::Data(size)
                };
            }
            ChunkAt::Data(left) => {
                let take = left.min(inb.len() as u64);
                inb.advance(take as usize);
                if take < left {
                    return Ok(Some(ChunkAt::Data(left - take)));
                }
                at = ChunkAt::DataEnd;
            }
            ChunkAt::DataEnd => {
                if inb.len() < 2 {
                    return Ok(Some(at));
                }
                if &inb[..2] != b"\r\n" {
                    return Err(());
                }
                inb.advance(2);
                at = ChunkAt::Size;
            }
            ChunkAt::Trailer => {
                let Some(eol) = find_crlf(inb) else {
                    return if inb.len() > MAX_HEAD {
                        Err(())
                    } else {
                        Ok(Some(at))
                    };
                };
                inb.advance(eol + 2);
                if eol == 0 {
                    return Ok(None);
                }
            }
        }
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(input: &[u8], heads: &[bool], split: usize) -> Vec<Parsed> {
        let mut reader = Reader::default();
        let mut inb = BytesMut::new();
        let mut out = Vec::new();
        let mut heads = heads.iter().copied();
        let mut head = heads.next();
        for piece in input.chunks(split) {
            inb.extend_from_slice(piece);
            loop {
                match reader.next(&mut inb, head) {
                    Parsed::NeedMore => break,
                    p => {
                        let invalid = p == Parsed::Invalid;
                        out.push(p);
                        head = heads.next();
                        if invalid {
                            return out;
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn reads_pipelined_answers_in_any_split() {
        let input = b"HTTP/1.1 100 Continue\r\n\r\n\
            HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello\
            HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: t\r\n\r\n\
            HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n\
            HTTP/1.1 204 No Content\r\n\r\n\
            HTTP/1.1 503 Busy\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        let want = vec![
            Parsed::Answer {
                status: 200,
                close: false,
            },
            Parsed::Answer {
                status: 404,
                close: false,
            },
            Parsed::Answer {
                status: 200,
                close: false,
            },
            Parsed::Answer {
                status: 204,
                close: false,
            },
            Parsed::Answer {
                status: 503,
                close: true,
            },
        ];
        // The third answer is to a HEAD request: its Content-Length declares no body here.
        let heads = [false, false, true, false, false];
        for split in [1, 2, 3, 7, 64, input.len()] {
            assert_eq!(read_all(input, &heads, split), want, "split {split}");
        }
    }

    #[test]
    fn http_1_0_closes_and_garbage_is_invalid() {
        let input = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let got = read_all(input, &[false], 4);
        assert_eq!(
            got,
            vec![Parsed::Answer {
                status: 200,
                close: true
            }]
        );
        let got = read_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            &[false],
            100,
        );
        assert_eq!(got, vec![Parsed::Invalid]);
        for bad in [&b"zz"[..], b"+3", b"-3", b" 3", b"0x3"] {
            let mut input = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            input.extend_from_slice(bad);
            input.extend_from_slice(b"\r\nabc\r\n0\r\n\r\n");
            let got = read_all(&input, &[false], 100);
            assert_eq!(got, vec![Parsed::Invalid], "chunk size {bad:?}");
        }
        // An answer no request waits for.
        let got = read_all(b"HTTP/1.1 200 OK\r\n\r\n", &[], 100);
        assert_eq!(got, vec![Parsed::Invalid]);
    }
}
