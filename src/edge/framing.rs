//! Strict HTTP/1.1 request framing, checked byte by byte on what a client sends, before
//! Pingora parses any of it. Pingora (through httparse) parses leniently; a gateway in
//! front of other HTTP servers must not, or two parsers can disagree on where a request
//! ends and a second request can be smuggled inside the first. The rule, from RFC 9112:
//!
//! - request-line: `method SP request-target SP HTTP/1.1|HTTP/1.0 CRLF` (§3), the method
//!   a token; the target in origin form (`/…`), absolute form (`http://…`, `https://…`) or
//!   `*` for `OPTIONS` (§3.2), made of visible ASCII or obs-text without `#`; empty lines
//!   before it are ignored (§2.2);
//! - field lines: `name ":" OWS value OWS CRLF` (§5), the name a token with nothing between
//!   it and the colon (§5.1), the value visible characters, SP, HTAB or obs-text; no
//!   obs-fold (§5.2); every line ends in CRLF, a bare CR or LF is refused (§2.2);
//! - framing (§6): `Transfer-Encoding` only as exactly one `chunked` (one field, one coding)
//!   and never in HTTP/1.0; `Content-Length` one plain decimal value in one field; never
//!   both; exactly one `Host` on HTTP/1.1, at most one on 1.0 (§3.2);
//! - chunked bodies (§7.1): a hex size (16 digits at most), extensions as
//!   `*( BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ] )`, CRLF, exactly `size`
//!   bytes of data, CRLF; the last chunk's trailer section has the grammar of field lines.
//!
//! The checker keeps no copy of the bytes: a few counters and the state of the grammar
//! where the last byte left it, so it gives the same verdict however the bytes are split
//! (the fuzz targets and unit tests feed the same input whole and byte by byte). It also
//! knows where each request ends, which is what lets [`super::stream`] hold back a head
//! until it is complete and time each phase of a connection.

/// Request-head limits (`clients:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest request line; a longer one gets 414 while in the request-target, 400 elsewhere.
    pub max_request_line: usize,
    /// Largest header section (every field line); over it: 431.
    pub max_header_bytes: usize,
    /// Most field lines in a head; over it: 431.
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_line: 8 * 1024,
            max_header_bytes: 32 * 1024,
            max_headers: 100,
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// 400: broken grammar or ambiguous framing.
    Bad(&'static str),
    /// 414: the request-target is longer than `max_request_line` allows.
    TargetTooLong,
    /// 431: too many or too large header fields.
    HeadersTooLarge,
    /// 505: an HTTP version other than 1.0 and 1.1.
    Version,
}

impl Reject {
    pub fn status(self) -> u16 {
        match self {
            Reject::Bad(_) => 400,
            Reject::TargetTooLong => 414,
            Reject::HeadersTooLarge => 431,
            Reject::Version => 505,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Reject::Bad(why) => why,
            Reject::TargetTooLong => "request-target too long",
            Reject::HeadersTooLarge => "request header fields too large",
            Reject::Version => "HTTP version not supported",
        }
    }
}

/// Where a connection's request stream stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Between requests: no byte of the next one yet.
    Idle,
    /// Part of a request head has arrived.
    Head,
    /// In a request body (or its trailers).
    Body,
}

/// Chunk lines and extensions longer than this are refused: nobody needs them, and every
/// byte of them is work.
const MAX_CHUNK_LINE: usize = 4096;
/// Empty lines tolerated before a request line.
const MAX_LEADING_EMPTY_LINES: u8 = 8;
/// Longest method accepted.
const MAX_METHOD: usize = 32;
const VERSION_PREFIX: &[u8] = b"HTTP/1.";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    ContentLength,
    TransferEncoding,
    Host,
    /// Only noted: a `101` answer to such a request turns the connection into a tunnel.
    Upgrade,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ext {
    /// After the size or a value, whitespace: only more of it or `;` may follow.
    WsBeforeSemi,
    /// After `;`: whitespace or the extension's name.
    AfterSemi,
    Name,
    /// Whitespace after a name: `=` or `;` must follow.
    AfterName,
    /// After `=`: whitespace, a token or a quoted string.
    AfterEq,
    Token,
    Quoted,
    QuotedEscape,
    AfterQuoted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    /// CR of an empty line before the request line.
    LeadingLf,
    Method,
    Target,
    /// How many bytes of `HTTP/1.x` matched.
    Version(u8),
    RequestLineLf,
    /// Start of a field line, or the CR of the empty line that ends the section.
    FieldStart,
    Name,
    /// Whitespace after the colon.
    ValueLead,
    Value,
    FieldLf,
    SectionEndLf,
    /// Content-Length body bytes left.
    Length(u64),
    ChunkSize,
    ChunkExt(Ext),
    ChunkSizeLf,
    /// Chunk data bytes left.
    ChunkData(u64),
    ChunkDataCr,
    ChunkDataLf,
    Failed(Reject),
}

/// What the head read so far declares.
#[derive(Debug, Default, Clone)]
struct Head {
    method: [u8; 8],
    method_len: usize,
    /// The first bytes of the request-target, enough to check its form.
    target: [u8; 8],
    target_len: usize,
    /// An absolute-form target's authority (kept only for that form, which is rare), and
    /// the Host value to compare it with: they must agree (RFC 9112 §3.2.2).
    absolute: Option<Vec<u8>>,
    host_value: Vec<u8>,
    http11: bool,
    content_length: Option<u64>,
    content_lengths: u32,
    transfer_encodings: u32,
    chunked: bool,
    hosts: u32,
    upgrade: bool,
}

/// The field line being read.
#[derive(Debug, Default, Clone, Copy)]
struct Line {
    name: [u8; 17],
    name_len: usize,
    kind: Option<Field>,
    /// The value so far, for Transfer-Encoding (the only value compared as text).
    value: [u8; 16],
    value_len: usize,
    /// Whitespace came after value characters: only more whitespace may follow for
    /// Content-Length and Host.
    ws_after: bool,
    digits: u32,
    number: u64,
    invalid: bool,
}

/// The request-stream checker of one client connection.
#[derive(Debug, Clone)]
pub struct Framer {
    limits: Limits,
    state: State,
    head: Head,
    line: Line,
    /// Bytes of the head being read (0 between requests).
    head_len: usize,
    /// Bytes of the field section (headers or trailers) being read.
    section_bytes: usize,
    fields: usize,
    leading_empty: u8,
    in_trailers: bool,
    chunk_size: u64,
    chunk_digits: u32,
    chunk_line: usize,
    heads: u64,
    /// A message ended during the current `feed`.
    ended: bool,
    /// Bytes of the last `feed`'s data up to the end of the last message that ended in it.
    clean: usize,
    /// Whether [`Framer::run`] may take runs of bytes at once (off only to check it).
    runs: bool,
}

/// A byte class as a table, for [`Framer::run`].
macro_rules! class {
    ($b:ident => $test:expr) => {{
        let mut table = [false; 256];
        let mut i = 0;
        while i < 256 {
            let $b = i as u8;
            table[i] = $test;
            i += 1;
        }
        table
    }};
}

/// Bytes a request-target may hold past its first few (where its form is decided).
const TARGET: [bool; 256] = class!(b => matches!(b, 0x21..=0x7e | 0x80..=0xff) && b != b'#');
const VALUE: [bool; 256] = class!(b => value_char(b));
const HOST: [bool; 256] = class!(b => host_char(b));

/// Whether `b` may appear in a token (RFC 9110 §5.6.2).
pub(crate) fn tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Whether `b` may appear in a field value: VCHAR, obs-text, SP or HTAB.
pub(crate) const fn value_char(b: u8) -> bool {
    matches!(b, b'\t' | b' ' | 0x21..=0x7e | 0x80..=0xff)
}

/// Whether `b` may appear in a Host value (RFC 3986 authority characters).
pub(crate) const fn host_char(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'['
                | b']'
                | b'%'
        )
}

pub(crate) fn ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

impl Framer {
    pub fn new(limits: Limits) -> Framer {
        Framer {
            limits,
            state: State::Idle,
            head: Head::default(),
            line: Line::default(),
            head_len: 0,
            section_bytes: 0,
            fields: 0,
            leading_empty: 0,
            in_trailers: false,
            chunk_size: 0,
            chunk_digits: 0,
            chunk_line: 0,
            heads: 0,
            ended: false,
            clean: 0,
            runs: true,
        }
    }

    /// A framer that takes every byte through [`Framer::step`]: the reference that tests
    /// and the fuzzer compare the fast path with.
    #[doc(hidden)]
    pub fn stepwise(limits: Limits) -> Framer {
        Framer {
            runs: false,
            ..Framer::new(limits)
        }
    }

    pub fn phase(&self) -> Phase {
        match self.state {
            _ if self.head_len > 0 => Phase::Head,
            State::Idle => Phase::Idle,
            _ => Phase::Body,
        }
    }

    /// Request heads completed so far.
    pub fn heads(&self) -> u64 {
        self.heads
    }

    /// The last complete head asked for a protocol upgrade (`Upgrade:`), and no later
    /// head has begun.
    pub fn upgrade_requested(&self) -> bool {
        self.heads > 0 && self.head_len == 0 && self.head.upgrade
    }

    /// Checks the next bytes of the stream. `Ok(open)`: they are fine so far, and the
    /// last `open` bytes seen (this call's and earlier ones') belong to a head that is not
    /// complete yet. A refusal is final: every later call returns it again.
    pub fn feed(&mut self, data: &[u8]) -> Result<usize, Reject> {
        let mut i = 0;
        self.clean = 0;
        while i < data.len() {
            if std::mem::take(&mut self.ended) {
                self.clean = i;
            }
            if let Some(reject) = self.failed() {
                return Err(reject);
            }
            match self.state {
                State::Length(left) => {
                    let take = left.min((data.len() - i) as u64);
                    i += take as usize;
                    self.state = match left - take {
                        0 => self.end_message(),
                        rest => State::Length(rest),
                    };
                }
                State::ChunkData(left) => {
                    let take = left.min((data.len() - i) as u64);
                    i += take as usize;
                    self.state = match left - take {
                        0 => State::ChunkDataCr,
                        rest => State::ChunkData(rest),
                    };
                }
                _ => match self.run(&data[i..]) {
                    0 => {
                        self.state = self.step(data[i]);
                        i += 1;
                    }
                    n => i += n,
                },
            }
        }
        if std::mem::take(&mut self.ended) {
            self.clean = data.len();
        }
        match self.failed() {
            Some(reject) => Err(reject),
            None => Ok(self.head_len),
        }
    }

    /// After a refusal: how many bytes of the data last fed come before the refused
    /// message, complete messages that may still be served.
    pub fn clean(&self) -> usize {
        self.clean
    }

    /// Takes at once the leading bytes of `data` that [`Framer::step`] would accept one by
    /// one without recording anything: the rest of a long request-target, or a run of a
    /// header value that is not compared (any value in trailers; Host's value is only
    /// checked, unless an absolute-form target makes it compared). Stops before the first
    /// byte that ends the run, changes the state, or reaches a limit; `step` takes that one.
    fn run(&mut self, data: &[u8]) -> usize {
        if !self.runs {
            return 0;
        }
        let (class, room) = match self.state {
            State::Target if self.head.target_len >= self.head.target.len() => {
                if self.head.absolute.is_some() {
                    return 0;
                }
                (
                    &TARGET,
                    self.limits.max_request_line.saturating_sub(self.head_len),
                )
            }
            State::Value => {
                let class = match self.line.kind {
                    _ if self.in_trailers => &VALUE,
                    Some(Field::Other | Field::Upgrade) => &VALUE,
                    Some(Field::Host) if !self.line.ws_after && self.head.absolute.is_none() => {
                        &HOST
                    }
                    _ => return 0,
                };
                (
                    class,
                    self.limits
                        .max_header_bytes
                        .saturating_sub(self.section_bytes),
                )
            }
            _ => return 0,
        };
        let n = data
            .iter()
            .take(room)
            .position(|&b| !class[usize::from(b)])
            .unwrap_or_else(|| data.len().min(room));
        match self.state {
            State::Target => self.head.target_len += n,
            _ => self.section_bytes += n,
        }
        if !self.in_trailers {
            self.head_len += n;
        }
        n
    }

    fn failed(&self) -> Option<Reject> {
        match self.state {
            State::Failed(r) => Some(r),
            _ => None,
        }
    }

    /// One byte of the grammar's non-bulk states.
    fn step(&mut self, b: u8) -> State {
        let in_head = !self.in_trailers && self.state_is_head();
        if in_head {
            self.head_len += 1;
        }
        match self.state {
            State::Idle => self.idle(b),
            State::LeadingLf => match b {
                b'\n' => State::Idle,
                _ => bad("bare CR before the request line"),
            },
            State::Method => self.method(b),
            State::Target => self.target(b),
            State::Version(n) => self.version(n, b),
            State::RequestLineLf => match b {
                b'\n' => self.start_section(),
                _ => bad("bare CR in the request line"),
            },
            State::FieldStart => self.field_start(b),
            State::Name => self.name(b),
            State::ValueLead | State::Value => self.value(b),
            State::FieldLf => match b {
                b'\n' => self.end_field(),
                _ => bad("bare CR in a header field"),
            },
            State::SectionEndLf => match b {
                b'\n' if self.in_trailers => self.end_message(),
                b'\n' => self.end_head(),
                _ => bad("bare CR at the end of the header section"),
            },
            State::ChunkSize => self.chunk_size(b),
            State::ChunkExt(e) => self.chunk_ext(e, b),
            State::ChunkSizeLf => match b {
                b'\n' if self.chunk_size == 0 => {
                    self.in_trailers = true;
                    self.start_section()
                }
                b'\n' => State::ChunkData(self.chunk_size),
                _ => bad("bare CR in a chunk line"),
            },
            State::ChunkDataCr => match b {
                b'\r' => State::ChunkDataLf,
                _ => bad("chunk data longer than its size"),
            },
            State::ChunkDataLf => match b {
                b'\n' => self.start_chunk(),
                _ => bad("bare CR after chunk data"),
            },
            // Bulk states are handled by `feed`; a failure is never stepped past.
            s @ (State::Length(_) | State::ChunkData(_) | State::Failed(_)) => s,
        }
    }

    fn state_is_head(&self) -> bool {
        matches!(
            self.state,
            State::Idle
                | State::LeadingLf
                | State::Method
                | State::Target
                | State::Version(_)
                | State::RequestLineLf
                | State::FieldStart
                | State::Name
                | State::ValueLead
                | State::Value
                | State::FieldLf
                | State::SectionEndLf
        )
    }

    /// Bytes of the request line so far (the head before its field section).
    fn check_line(&self, in_target: bool) -> Option<State> {
        let reject = match in_target {
            true => Reject::TargetTooLong,
            false => Reject::Bad("request line too long"),
        };
        (self.head_len > self.limits.max_request_line).then_some(State::Failed(reject))
    }

    fn idle(&mut self, b: u8) -> State {
        match b {
            b'\r' if self.leading_empty < MAX_LEADING_EMPTY_LINES => {
                self.leading_empty += 1;
                State::LeadingLf
            }
            b'\r' => bad("too many empty lines before the request line"),
            _ if tchar(b) => {
                self.head = Head::default();
                self.method(b)
            }
            b'\n' => bad("bare LF before the request line"),
            _ => bad("invalid method"),
        }
    }

    fn method(&mut self, b: u8) -> State {
        match b {
            b' ' if self.head.method_len > 0 => State::Target,
            _ if tchar(b) && self.head.method_len < MAX_METHOD => {
                if let Some(slot) = self.head.method.get_mut(self.head.method_len) {
                    *slot = b;
                }
                self.head.method_len += 1;
                State::Method
            }
            _ if tchar(b) => bad("method too long"),
            _ => bad("invalid method"),
        }
    }

    fn method_is(&self, name: &[u8]) -> bool {
        self.head.method_len == name.len() && &self.head.method[..name.len()] == name
    }

    fn target(&mut self, b: u8) -> State {
        if let Some(fail) = self.check_line(true) {
            return fail;
        }
        match b {
            b' ' if self.head.target_len > 0 => match self.target_form() {
                Ok(()) => {
                    self.keep_authority();
                    State::Version(0)
                }
                Err(r) => State::Failed(r),
            },
            b'#' => bad("fragment in the request-target"),
            0x21..=0x7e | 0x80..=0xff => {
                let h = &mut self.head;
                if let Some(slot) = h.target.get_mut(h.target_len) {
                    *slot = b;
                }
                if h.target_len == 0 && b.is_ascii_alphabetic() {
                    h.absolute = Some(Vec::new());
                }
                if let Some(target) = &mut h.absolute {
                    target.push(b);
                }
                h.target_len += 1;
                State::Target
            }
            b' ' => bad("empty request-target"),
            _ => bad("invalid character in the request-target"),
        }
    }

    /// The request-target's form must suit the method (RFC 9112 §3.2).
    fn target_form(&self) -> Result<(), Reject> {
        let h = &self.head;
        let start = &h.target[..h.target_len.min(h.target.len())];
        if self.method_is(b"CONNECT") {
            return Err(Reject::Bad("CONNECT is not supported"));
        }
        if start.first() == Some(&b'/') {
            return Ok(());
        }
        if start == b"*" {
            return match self.method_is(b"OPTIONS") {
                true => Ok(()),
                false => Err(Reject::Bad("asterisk-form is only for OPTIONS")),
            };
        }
        let absolute = |scheme: &[u8]| {
            h.target_len > scheme.len()
                && start.len() >= scheme.len()
                && start[..scheme.len()].eq_ignore_ascii_case(scheme)
        };
        if absolute(b"http://") || absolute(b"https://") {
            return Ok(());
        }
        Err(Reject::Bad("invalid request-target form"))
    }

    /// Keeps only the authority of an absolute-form target.
    fn keep_authority(&mut self) {
        if let Some(target) = self.head.absolute.take() {
            let rest = match target.iter().position(|&b| b == b':') {
                Some(i) => &target[(i + 3).min(target.len())..],
                None => &target[..0],
            };
            let end = rest
                .iter()
                .position(|&b| b == b'/' || b == b'?')
                .unwrap_or(rest.len());
            self.head.absolute = Some(rest[..end].to_ascii_lowercase());
        }
    }

    fn version(&mut self, n: u8, b: u8) -> State {
        if let Some(fail) = self.check_line(false) {
            return fail;
        }
        let n = n as usize;
        match n {
            _ if n < VERSION_PREFIX.len() => {
                if b == VERSION_PREFIX[n] {
                    State::Version(n as u8 + 1)
                } else if n >= 5 && b.is_ascii_digit() {
                    State::Failed(Reject::Version)
                } else {
                    bad("invalid HTTP version")
                }
            }
            7 => match b {
                b'1' | b'0' => {
                    self.head.http11 = b == b'1';
                    State::Version(8)
                }
                _ if b.is_ascii_digit() => State::Failed(Reject::Version),
                _ => bad("invalid HTTP version"),
            },
            _ => match b {
                b'\r' => State::RequestLineLf,
                b'\n' => bad("bare LF after the request line"),
                _ if b.is_ascii_digit() => State::Failed(Reject::Version),
                _ => bad("invalid HTTP version"),
            },
        }
    }

    fn start_section(&mut self) -> State {
        self.section_bytes = 0;
        self.fields = 0;
        State::FieldStart
    }

    /// Counts a byte of a field section against the limits.
    fn count_section_byte(&mut self) -> Option<State> {
        self.section_bytes += 1;
        (self.section_bytes > self.limits.max_header_bytes).then(|| self.too_large())
    }

    fn too_large(&self) -> State {
        match self.in_trailers {
            true => bad("trailer section too large"),
            false => State::Failed(Reject::HeadersTooLarge),
        }
    }

    fn field_start(&mut self, b: u8) -> State {
        if let Some(fail) = self.count_section_byte() {
            return fail;
        }
        match b {
            b'\r' => State::SectionEndLf,
            b' ' | b'\t' => bad("obsolete line folding"),
            b'\n' => bad("bare LF in the header section"),
            _ if tchar(b) => {
                self.fields += 1;
                if self.fields > self.limits.max_headers {
                    return self.too_large();
                }
                self.line = Line::default();
                self.name(b)
            }
            _ => bad("invalid character in a header name"),
        }
    }

    fn name(&mut self, b: u8) -> State {
        if self.state == State::Name {
            if let Some(fail) = self.count_section_byte() {
                return fail;
            }
        }
        let line = &mut self.line;
        match b {
            b':' => {
                let name = &line.name[..line.name_len.min(line.name.len())];
                line.kind = Some(match name {
                    _ if line.name_len > line.name.len() => Field::Other,
                    b"content-length" => Field::ContentLength,
                    b"transfer-encoding" => Field::TransferEncoding,
                    b"host" => Field::Host,
                    b"upgrade" => Field::Upgrade,
                    _ => Field::Other,
                });
                State::ValueLead
            }
            _ if tchar(b) => {
                if let Some(slot) = line.name.get_mut(line.name_len) {
                    *slot = b.to_ascii_lowercase();
                }
                line.name_len += 1;
                State::Name
            }
            b' ' | b'\t' => bad("whitespace between a header name and its colon"),
            _ => bad("invalid character in a header name"),
        }
    }

    fn value(&mut self, b: u8) -> State {
        if let Some(fail) = self.count_section_byte() {
            return fail;
        }
        if b == b'\r' {
            return State::FieldLf;
        }
        if !value_char(b) {
            return bad(match b {
                b'\n' => "bare LF in a header field",
                0 => "NUL in a header field",
                _ => "control character in a header field",
            });
        }
        if self.state == State::ValueLead && ows(b) {
            return State::ValueLead;
        }
        if self.in_trailers {
            return State::Value;
        }
        let line = &mut self.line;
        if ows(b) {
            line.ws_after = true;
            if line.kind == Some(Field::TransferEncoding) {
                push_value(line, b);
            }
            return State::Value;
        }
        match line.kind {
            Some(Field::ContentLength) => {
                if line.ws_after || !b.is_ascii_digit() {
                    return bad("Content-Length is not one decimal number");
                }
                line.digits += 1;
                line.number = match line
                    .number
                    .checked_mul(10)
                    .and_then(|n| n.checked_add(u64::from(b - b'0')))
                {
                    Some(n) => n,
                    None => return bad("Content-Length too large"),
                };
            }
            Some(Field::Host) => {
                if line.ws_after || !host_char(b) {
                    return bad("invalid Host");
                }
                if self.head.absolute.is_some() && self.head.host_value.len() < 512 {
                    self.head.host_value.push(b.to_ascii_lowercase());
                }
            }
            Some(Field::TransferEncoding) => {
                line.ws_after = false;
                push_value(line, b);
            }
            _ => {}
        }
        State::Value
    }

    /// A field line is complete: what it declares is recorded.
    fn end_field(&mut self) -> State {
        if self.in_trailers {
            return State::FieldStart;
        }
        let line = &self.line;
        let head = &mut self.head;
        match line.kind {
            Some(Field::ContentLength) => {
                head.content_lengths += 1;
                if line.digits == 0 {
                    return bad("empty Content-Length");
                }
                if head.content_lengths > 1 {
                    return bad("more than one Content-Length");
                }
                head.content_length = Some(line.number);
            }
            Some(Field::TransferEncoding) => {
                head.transfer_encodings += 1;
                let value = &line.value[..line.value_len];
                let trimmed = value
                    .iter()
                    .rposition(|b| !ows(*b))
                    .map_or(&value[..0], |end| &value[..=end]);
                head.chunked = !line.invalid && trimmed.eq_ignore_ascii_case(b"chunked");
            }
            Some(Field::Host) => head.hosts += 1,
            Some(Field::Upgrade) => head.upgrade = true,
            Some(Field::Other) | None => {}
        }
        State::FieldStart
    }

    /// The empty line after the header fields: the head is complete, and its framing
    /// decides how the body ends.
    fn end_head(&mut self) -> State {
        let h = &self.head;
        if h.http11 && h.hosts != 1 {
            return bad("an HTTP/1.1 request needs exactly one Host");
        }
        if h.hosts > 1 {
            return bad("more than one Host");
        }
        if h.absolute
            .as_ref()
            .is_some_and(|a| h.hosts == 1 && *a != h.host_value)
        {
            return bad("Host differs from the request-target's authority");
        }
        let next = if h.transfer_encodings > 0 {
            if !h.http11 {
                return bad("Transfer-Encoding in an HTTP/1.0 request");
            }
            if h.content_lengths > 0 {
                return bad("both Content-Length and Transfer-Encoding");
            }
            if h.transfer_encodings > 1 || !h.chunked {
                return bad("Transfer-Encoding other than exactly one chunked");
            }
            None
        } else {
            Some(h.content_length.unwrap_or(0))
        };
        // The head is good: it may go on, and the next one starts from zero.
        self.heads += 1;
        self.head_len = 0;
        self.leading_empty = 0;
        match next {
            None => self.start_chunk(),
            Some(0) => self.end_message(),
            Some(n) => State::Length(n),
        }
    }

    fn end_message(&mut self) -> State {
        self.ended = true;
        self.in_trailers = false;
        State::Idle
    }

    fn start_chunk(&mut self) -> State {
        self.chunk_size = 0;
        self.chunk_digits = 0;
        self.chunk_line = 0;
        State::ChunkSize
    }

    fn chunk_line_byte(&mut self) -> Option<State> {
        self.chunk_line += 1;
        (self.chunk_line > MAX_CHUNK_LINE).then(|| bad("chunk line too long"))
    }

    fn chunk_size(&mut self, b: u8) -> State {
        if let Some(fail) = self.chunk_line_byte() {
            return fail;
        }
        if let Some(digit) = (b as char).to_digit(16) {
            self.chunk_digits += 1;
            if self.chunk_digits > 16 {
                return bad("chunk size too long");
            }
            self.chunk_size = (self.chunk_size << 4) | u64::from(digit);
            return State::ChunkSize;
        }
        if self.chunk_digits == 0 {
            return bad("invalid chunk size");
        }
        match b {
            b'\r' => State::ChunkSizeLf,
            b';' => State::ChunkExt(Ext::AfterSemi),
            b' ' | b'\t' => State::ChunkExt(Ext::WsBeforeSemi),
            b'\n' => bad("bare LF in a chunk line"),
            _ => bad("invalid chunk size"),
        }
    }

    fn chunk_ext(&mut self, e: Ext, b: u8) -> State {
        if let Some(fail) = self.chunk_line_byte() {
            return fail;
        }
        use Ext::*;
        let next = match (e, b) {
            (Quoted, b'"') => AfterQuoted,
            (Quoted, b'\\') => QuotedEscape,
            (Quoted, b'\t' | b' ' | 0x21 | 0x23..=0x5b | 0x5d..=0x7e | 0x80..=0xff) => Quoted,
            (QuotedEscape, b'\t' | b' ' | 0x21..=0x7e | 0x80..=0xff) => Quoted,
            (Quoted | QuotedEscape, _) => return bad("invalid quoted chunk extension"),
            (Name | Token | AfterQuoted, b'\r') => return State::ChunkSizeLf,
            (WsBeforeSemi | AfterSemi | AfterName | AfterEq, b' ' | b'\t') => e,
            (Name | Token | AfterQuoted, b' ' | b'\t') if e == Name => AfterName,
            (Token | AfterQuoted, b' ' | b'\t') => WsBeforeSemi,
            (WsBeforeSemi | Name | AfterName | Token | AfterQuoted, b';') => AfterSemi,
            (AfterSemi | Name, _) if tchar(b) => Name,
            (Name | AfterName, b'=') => AfterEq,
            (AfterEq | Token, _) if tchar(b) => Token,
            (AfterEq, b'"') => Quoted,
            (_, b'\n') => return bad("bare LF in a chunk line"),
            (_, b'\r') => return bad("chunk line ends inside an extension"),
            _ => return bad("invalid chunk extension"),
        };
        State::ChunkExt(next)
    }
}

fn push_value(line: &mut Line, b: u8) {
    match line.value.get_mut(line.value_len) {
        Some(slot) => {
            *slot = b;
            line.value_len += 1;
        }
        // Longer than any single `chunked`: refused at the end of the line.
        None => line.invalid = true,
    }
}

fn bad(why: &'static str) -> State {
    State::Failed(Reject::Bad(why))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` whole, then byte by byte through the reference path, and checks both
    /// give the same verdict.
    fn verdict(input: &[u8]) -> Result<(u64, Phase), Reject> {
        verdict_with(Limits::default(), input)
    }

    fn verdict_with(limits: Limits, input: &[u8]) -> Result<(u64, Phase), Reject> {
        let whole = {
            let mut f = Framer::new(limits);
            f.feed(input).map(|open| (open, f.heads(), f.phase()))
        };
        let split = {
            let mut f = Framer::stepwise(limits);
            let mut r = Ok(0);
            for b in input {
                r = f.feed(std::slice::from_ref(b));
                if r.is_err() {
                    break;
                }
            }
            r.map(|open| (open, f.heads(), f.phase()))
        };
        assert_eq!(whole, split, "{:?}", String::from_utf8_lossy(input));
        whole.map(|(_, heads, phase)| (heads, phase))
    }

    #[test]
    fn whole_requests_end_where_their_framing_says() {
        let get = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(verdict(get), Ok((1, Phase::Idle)));
        let post = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(verdict(post), Ok((2, Phase::Idle)));
        let chunked = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;a=b;c=\"d\\\"\"\r\nabc\r\n0\r\nX-T: 1\r\n\r\n";
        assert_eq!(verdict(chunked), Ok((1, Phase::Idle)));
        assert_eq!(verdict(b"\r\nGET / HTTP/1.0\r\n\r\n"), Ok((1, Phase::Idle)));
        assert_eq!(verdict(b"GET / HTTP/1.1\r\nHo"), Ok((0, Phase::Head)));
        let body = b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nab";
        assert_eq!(verdict(body), Ok((1, Phase::Body)));
    }

    #[test]
    fn open_counts_the_bytes_of_an_incomplete_head() {
        let mut f = Framer::new(Limits::default());
        assert_eq!(f.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /b"), Ok(6));
        assert_eq!(f.feed(b" HTTP/1.1\r\n"), Ok(17));
        assert_eq!(f.feed(b"Host: a\r\n\r\n"), Ok(0));
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for bad in [
            &b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            b"GET /\0 HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(verdict(bad), Err(Reject::Bad(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn limits_give_their_own_answers() {
        let long_target = format!("GET /{} HTTP/1.1\r\n", "a".repeat(9000));
        assert_eq!(verdict(long_target.as_bytes()), Err(Reject::TargetTooLong));
        let many = format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
            "X: 1\r\n".repeat(100)
        );
        assert_eq!(verdict(many.as_bytes()), Err(Reject::HeadersTooLarge));
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "b".repeat(33_000)
        );
        assert_eq!(verdict(big.as_bytes()), Err(Reject::HeadersTooLarge));
        assert_eq!(verdict(b"GET / HTTP/2.0\r\n"), Err(Reject::Version));
    }

    #[test]
    fn complete_messages_before_a_refused_one_stay_clean() {
        let mut f = Framer::new(Limits::default());
        let good = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nab";
        let mut all = good.to_vec();
        all.extend_from_slice(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n");
        assert!(f.feed(&all).is_err());
        assert_eq!(f.clean(), good.len());
    }

    #[test]
    fn a_refusal_is_final() {
        let mut f = Framer::new(Limits::default());
        assert!(f.feed(b"GET / HTTP/1.1\r\nHost\x01: a\r\n").is_err());
        assert!(f.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").is_err());
    }

    /// The runs taken at once stop where stepping stops: at each limit, to the byte, and
    /// at every byte that ends or spoils a target or a value.
    #[test]
    fn runs_agree_with_stepping_at_every_boundary() {
        let limits = Limits {
            max_request_line: 40,
            max_header_bytes: 60,
            max_headers: 4,
        };
        let mut inputs = Vec::new();
        for n in 20..50 {
            let a = "a".repeat(n);
            inputs.push(format!("GET /{a} HTTP/1.1\r\nHost: h\r\n\r\n"));
            inputs.push(format!("GET / HTTP/1.1\r\nHost: h\r\nX-Long: {a}\r\n\r\n"));
            inputs.push(format!("GET / HTTP/1.1\r\nHost: {a}\r\n\r\n"));
            inputs.push(format!(
                "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n\
                 0\r\nT: {a}\r\n\r\n"
            ));
        }
        for bad in [
            "#", "\0", "\x01", " ", "\t", "\n", "\x7f", "\u{e9}", "@", "/",
        ] {
            let a = "a".repeat(12);
            inputs.push(format!("GET /{a}{bad}b HTTP/1.1\r\nHost: h\r\n\r\n"));
            inputs.push(format!(
                "GET / HTTP/1.1\r\nHost: h\r\nX: {a}{bad}b \r\n\r\n"
            ));
            inputs.push(format!("GET / HTTP/1.1\r\nHost: {a}{bad}b\r\n\r\n"));
            inputs.push(format!(
                "GET http://{a}/ HTTP/1.1\r\nHost: {a}{bad}\r\n\r\n"
            ));
        }
        let mut outcomes = std::collections::HashSet::new();
        for input in &inputs {
            outcomes.insert(format!("{:?}", verdict_with(limits, input.as_bytes())));
        }
        // The inputs reach completion, every limit and bad characters alike.
        for seen in ["Ok((1, Idle))", "TargetTooLong", "HeadersTooLarge", "Bad("] {
            assert!(
                outcomes.iter().any(|o| o.contains(seen)),
                "{seen}: {outcomes:?}"
            );
        }
    }
}
