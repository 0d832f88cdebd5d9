//! The reader of answers on a mirror lane: HTTP/1.1 answers arriving pipelined on one
//! connection, read one after the other, so that each copy's status can be counted and the
//! connection reused. Bodies are skipped, except that the answer to a compared copy is
//! reduced as it passes (head kept, body fed to a [`BodyDigest`]: hash, length, excerpt, and a
//! JSON body up to the comparison's `max_body`); it holds at most one answer head
//! ([`MAX_HEAD`]) of bytes besides. Anything it cannot frame exactly (a bad length, a bad
//! chunk, an answer nobody asked for) ends the connection.

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};

use super::compare::{BodyDigest, Reduce, Seen};

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
    /// A complete final answer; `close`: the mirror closes the connection after it;
    /// `seen`: the answer reduced, when it was awaited with [`Awaited::reduce`].
    Answer {
        status: u16,
        close: bool,
        seen: Option<Seen>,
    },
    Invalid,
}

/// The answer a lane waits for next.
#[derive(Debug, Clone, Copy)]
pub struct Awaited {
    /// It answers a HEAD request: it has no body, whatever it declares.
    pub head: bool,
    /// Reduce it for a comparison (its copy is compared with the primary's answer).
    pub reduce: Option<Reduce>,
}

/// The answers (status, close, reduced answer) the reader finds in `data` when it arrives
/// in two pieces split at `split`, reducing every answer, and whether it ended on something
/// invalid. For the fuzz target (`fuzz/`): the result must not depend on where the bytes
/// were split.
#[doc(hidden)]
pub fn read_all(data: &[u8], split: usize) -> (Vec<(u16, bool, Option<Seen>)>, bool) {
    let mut reader = Reader::default();
    let mut inb = BytesMut::new();
    let mut answers = Vec::new();
    let split = split.min(data.len());
    let awaited = Awaited {
        head: false,
        reduce: Some(Reduce {
            max_body: 1024,
            json: true,
        }),
    };
    for piece in [&data[..split], &data[split..]] {
        inb.extend_from_slice(piece);
        loop {
            match reader.next(&mut inb, Some(awaited)) {
                Parsed::NeedMore => break,
                Parsed::Answer {
                    status,
                    close,
                    seen,
                } => answers.push((status, close, seen)),
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

/// Reads pipelined answers one after the other, skipping their bodies or reducing them.
#[derive(Default)]
pub struct Reader {
    state: ReadState,
    /// The head and body digest of the answer being reduced.
    reducing: Option<(HeaderMap, BodyDigest)>,
}

impl Reader {
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, ReadState::Head)
    }

    /// The connection closed: the status (and reduced answer) of the answer this
    /// completes, if it was one whose body lasts until the close.
    pub fn closed(&mut self) -> Option<(u16, Option<Seen>)> {
        match self.state {
            ReadState::UntilClose { status } => Some((status, self.finish(status))),
            _ => None,
        }
    }

    /// Body bytes of the current answer, passing.
    fn body(&mut self, bytes: &[u8]) {
        if let Some((_, digest)) = &mut self.reducing {
            digest.update(bytes);
        }
    }

    /// The current answer ended: the next bytes start a new one.
    fn complete(&mut self, status: u16, close: bool) -> Parsed {
        self.state = ReadState::Head;
        let seen = self.finish(status);
        Parsed::Answer {
            status,
            close,
            seen,
        }
    }

    fn finish(&mut self, status: u16) -> Option<Seen> {
        let (headers, digest) = self.reducing.take()?;
        Some(digest.finish(status, headers))
    }

    /// Consumes from `inb` up to the end of the next complete answer, the one `awaited`
    /// describes (`None`: no request is waiting).
    pub fn next(&mut self, inb: &mut BytesMut, awaited: Option<Awaited>) -> Parsed {
        loop {
            match self.state {
                ReadState::Head => {
                    if inb.is_empty() {
                        return Parsed::NeedMore;
                    }
                    let Some(awaited) = awaited else {
                        return Parsed::Invalid; // an answer nobody asked for
                    };
                    let reduce = awaited.reduce;
                    match parse_head(inb, awaited.head, reduce.is_some()) {
                        Ok(Some((used, state, headers))) => {
                            inb.advance(used);
                            self.state = state;
                            if let (Some(reduce), Some(headers), false) =
                                (reduce, headers, state == ReadState::Head)
                            {
                                let digest = reduce.digest(&headers);
                                self.reducing = Some((headers, digest));
                            }
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
                    self.body(&inb[..take as usize]);
                    inb.advance(take as usize);
                    if take < left {
                        self.state = ReadState::Length {
                            left: left - take,
                            status,
                            close,
                        };
                        return Parsed::NeedMore;
                    }
                    return self.complete(status, close);
                }
                ReadState::Chunked { at, status, close } => {
                    let digest = self.reducing.as_mut().map(|(_, d)| d);
                    match read_chunked(at, inb, digest) {
                        Ok(Some(at)) => {
                            self.state = ReadState::Chunked { at, status, close };
                            return Parsed::NeedMore;
                        }
                        Ok(None) => return self.complete(status, close),
                        Err(()) => return Parsed::Invalid,
                    }
                }
                ReadState::UntilClose { .. } => {
                    self.body(inb);
                    inb.clear();
                    return Parsed::NeedMore;
                }
            }
        }
    }
}

/// The length, what follows and (with `keep`) the header fields of one answer head.
type Head = (usize, ReadState, Option<HeaderMap>);

/// Parses one answer head: its length and what follows it. 1xx heads are consumed with a
/// `Head` state (the final answer follows).
fn parse_head(inb: &[u8], head_request: bool, keep: bool) -> Result<Option<Head>, ()> {
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
        return Ok(Some((used, ReadState::Head, None)));
    }
    let kept = keep.then(|| {
        // One copy of the head; every value is a slice of it.
        let bytes = Bytes::copy_from_slice(&inb[..used]);
        let mut map = HeaderMap::with_capacity(resp.headers.len());
        for h in resp.headers.iter() {
            // httparse hands out slices of `inb`; anything else is copied.
            let at = (h.value.as_ptr() as usize).wrapping_sub(inb.as_ptr() as usize);
            let value = match at.checked_add(h.value.len()) {
                Some(end) if end <= used => HeaderValue::from_maybe_shared(bytes.slice(at..end)),
                _ => HeaderValue::from_bytes(h.value),
            };
            if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(h.name.as_bytes()), value) {
                map.append(name, value);
            }
        }
        map
    });
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
    Ok(Some((used, state, kept)))
}

/// Reads chunked body bytes, feeding their data to `digest` if there is one; `Ok(None)` at
/// the end of the body, `Ok(Some(at))` when more bytes are needed.
fn read_chunked(
    mut at: ChunkAt,
    inb: &mut BytesMut,
    mut digest: Option<&mut BodyDigest>,
) -> Result<Option<ChunkAt>, ()> {
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
                if let Some(d) = digest.as_deref_mut() {
                    d.update(&inb[..take as usize]);
                }
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

    /// The answers found in `input` fed in pieces of `split` bytes, each awaited as
    /// `awaited` says (in order), until the first invalid one.
    fn read_all(input: &[u8], awaited: &[Awaited], split: usize) -> Vec<Parsed> {
        let mut reader = Reader::default();
        let mut inb = BytesMut::new();
        let mut out = Vec::new();
        let mut awaited = awaited.iter().copied();
        let mut next = awaited.next();
        for piece in input.chunks(split) {
            inb.extend_from_slice(piece);
            loop {
                match reader.next(&mut inb, next) {
                    Parsed::NeedMore => break,
                    p => {
                        let invalid = p == Parsed::Invalid;
                        out.push(p);
                        next = awaited.next();
                        if invalid {
                            return out;
                        }
                    }
                }
            }
        }
        out
    }

    fn plain(heads: &[bool]) -> Vec<Awaited> {
        heads
            .iter()
            .map(|&head| Awaited { head, reduce: None })
            .collect()
    }

    fn answer(status: u16, close: bool) -> Parsed {
        Parsed::Answer {
            status,
            close,
            seen: None,
        }
    }

    const PIPELINED: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n\
        HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello\
        HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\nX-V: 1\r\n\r\n3;x=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: t\r\n\r\n\
        HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n\
        HTTP/1.1 204 No Content\r\n\r\n\
        HTTP/1.1 503 Busy\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";

    #[test]
    fn reads_pipelined_answers_in_any_split() {
        let want = vec![
            answer(200, false),
            answer(404, false),
            answer(200, false),
            answer(204, false),
            answer(503, true),
        ];
        // The third answer is to a HEAD request: its Content-Length declares no body here.
        let awaited = plain(&[false, false, true, false, false]);
        for split in [1, 2, 3, 7, 64, PIPELINED.len()] {
            assert_eq!(read_all(PIPELINED, &awaited, split), want, "split {split}");
        }
    }

    #[test]
    fn reduces_the_answers_of_compared_copies_only() {
        let reduce = Some(Reduce {
            max_body: 10,
            json: false,
        });
        // The second (chunked) answer is compared; the others are skipped as usual.
        let mut awaited = plain(&[false, false, true, false, false]);
        awaited[1].reduce = reduce;
        let mut digest = BodyDigest::new(10, false);
        digest.update(b"abc0123456789abcdef");
        let mut headers = HeaderMap::new();
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert("x-v", HeaderValue::from_static("1"));
        let want = Parsed::Answer {
            status: 404,
            close: false,
            seen: Some(digest.finish(404, headers)),
        };
        for split in [1, 2, 5, 64, PIPELINED.len()] {
            let got = read_all(PIPELINED, &awaited, split);
            assert_eq!(got.len(), 5, "split {split}");
            assert_eq!(got[1], want, "split {split}");
            assert_eq!(got[0], answer(200, false), "split {split}");
            let Parsed::Answer { seen, .. } = &got[1] else {
                unreachable!()
            };
            let seen = seen.as_ref().unwrap();
            assert_eq!(
                (seen.length, &seen.excerpt[..]),
                (19, &b"abc0123456789abcdef"[..])
            );
        }
        // A body that lasts until the close is reduced when the close comes.
        let mut reader = Reader::default();
        let mut inb = BytesMut::from(&b"HTTP/1.0 200 OK\r\n\r\nuntil the close"[..]);
        let compared = Awaited {
            head: false,
            reduce,
        };
        assert_eq!(reader.next(&mut inb, Some(compared)), Parsed::NeedMore);
        let (status, seen) = reader.closed().unwrap();
        assert_eq!(status, 200);
        assert_eq!(seen.unwrap().length, 15);
    }

    #[test]
    fn http_1_0_closes_and_garbage_is_invalid() {
        let input = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(
            read_all(input, &plain(&[false]), 4),
            vec![answer(200, true)]
        );
        let got = read_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            &plain(&[false]),
            100,
        );
        assert_eq!(got, vec![Parsed::Invalid]);
        for bad in [&b"zz"[..], b"+3", b"-3", b" 3", b"0x3"] {
            let mut input = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            input.extend_from_slice(bad);
            input.extend_from_slice(b"\r\nabc\r\n0\r\n\r\n");
            let got = read_all(&input, &plain(&[false]), 100);
            assert_eq!(got, vec![Parsed::Invalid], "chunk size {bad:?}");
        }
        // An answer no request waits for.
        let got = read_all(b"HTTP/1.1 200 OK\r\n\r\n", &[], 100);
        assert_eq!(got, vec![Parsed::Invalid]);
    }
}
