//! Mirror comparison (`compare:` on a mirror): whether the mirror answered like the primary.
//! Both answers are reduced as they stream past to a [`Seen`]: status, headers, body length,
//! a hash of the first `max_body` bytes, the first [`KEPT_EXCERPT`] bytes, and (only for JSON
//! bodies on a mirror with `ignore_json_fields`, and only up to `max_body`) the body itself.
//! [`judge`] says how they differ; differing pairs are kept, newest first and at most
//! `keep` per mirror, for `GET /mirror/diffs` and the dashboard's side-by-side view.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::hash::Hasher;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName};
use serde_json::{json, Value};

/// Bytes of each body that `/mirror/diffs` shows.
pub const EXCERPT: usize = 256;
/// Bytes of each body kept with a differing pair (the dashboard shows them side by side).
pub const KEPT_EXCERPT: usize = 1024;

pub use crate::config::CompareConfig;

impl CompareConfig {
    /// How each answer of a comparison is reduced.
    pub fn reduce(&self) -> Reduce {
        Reduce {
            max_body: self.max_body,
            json: !self.ignore_json_fields.is_empty(),
        }
    }
}

/// How an answer is reduced for a comparison: its body hashed up to `max_body` bytes and,
/// with `json` (the mirror ignores JSON fields), a JSON body no longer than that kept whole.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reduce {
    pub max_body: u64,
    pub json: bool,
}

impl Reduce {
    /// The digest for the body of an answer with these headers.
    pub fn digest(self, headers: &HeaderMap) -> BodyDigest {
        BodyDigest::new(self.max_body, self.json && is_json(headers))
    }
}

/// What a comparison concluded: the `result` label of `fanout_mirror_compare_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Match,
    Status,
    Headers,
    Body,
    /// One side is missing: the copy was dropped, timed out or failed, or the client went
    /// away before the primary's answer ended.
    Incomplete,
}

impl Verdict {
    pub const ALL: [Verdict; 5] = [
        Verdict::Match,
        Verdict::Status,
        Verdict::Headers,
        Verdict::Body,
        Verdict::Incomplete,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Verdict::Match => "match",
            Verdict::Status => "status",
            Verdict::Headers => "headers",
            Verdict::Body => "body",
            Verdict::Incomplete => "incomplete",
        }
    }
}

/// One answer, as the comparison sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub status: u16,
    pub headers: HeaderMap,
    pub length: u64,
    pub hash: u64,
    pub excerpt: Bytes,
    /// The whole body, when it is JSON, no longer than `max_body`, and JSON fields are to
    /// be ignored.
    pub json: Option<Bytes>,
}

/// A body reduced as it streams past: length, hash of its first `max_body` bytes, excerpt,
/// and optionally a copy (for JSON comparison, up to `max_body`).
pub struct BodyDigest {
    max_body: u64,
    length: u64,
    hasher: std::collections::hash_map::DefaultHasher,
    excerpt: BytesMut,
    copy: Option<BytesMut>,
}

impl BodyDigest {
    /// `copy`: keep the body too (dropped once it passes `max_body`).
    pub fn new(max_body: u64, copy: bool) -> BodyDigest {
        BodyDigest {
            max_body,
            length: 0,
            hasher: Default::default(),
            excerpt: BytesMut::new(),
            copy: copy.then(BytesMut::new),
        }
    }

    pub fn update(&mut self, chunk: &[u8]) {
        let hashed = self
            .max_body
            .saturating_sub(self.length)
            .min(chunk.len() as u64) as usize;
        self.hasher.write(&chunk[..hashed]);
        let room = KEPT_EXCERPT
            .saturating_sub(self.excerpt.len())
            .min(chunk.len());
        self.excerpt.extend_from_slice(&chunk[..room]);
        self.length += chunk.len() as u64;
        if self.length > self.max_body {
            self.copy = None;
        } else if let Some(copy) = &mut self.copy {
            copy.extend_from_slice(chunk);
        }
    }

    pub fn finish(self, status: u16, headers: HeaderMap) -> Seen {
        Seen {
            status,
            headers,
            length: self.length,
            hash: self.hasher.finish(),
            excerpt: self.excerpt.freeze(),
            json: self.copy.map(BytesMut::freeze),
        }
    }
}

/// Whether an answer's body is JSON (`application/json`, or any `+json` type).
pub fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| {
            let t = t.trim().to_ascii_lowercase();
            t == "application/json" || t.ends_with("+json")
        })
}

/// The headers both answers name (minus ignored ones and those never comparable: framing
/// and hop-by-hop) whose values differ.
pub fn differing_headers(cfg: &CompareConfig, a: &HeaderMap, b: &HeaderMap) -> Vec<HeaderName> {
    const NEVER: [HeaderName; 4] = [
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::CONNECTION,
        header::DATE,
    ];
    let mut out: Vec<HeaderName> = a
        .keys()
        .filter(|k| b.contains_key(*k))
        .filter(|k| !NEVER.contains(k) && !cfg.ignore_headers.contains(k))
        .filter(|k| !a.get_all(*k).iter().eq(b.get_all(*k).iter()))
        .cloned()
        .collect();
    out.sort_by(|x, y| x.as_str().cmp(y.as_str()));
    out
}

/// How the mirror's answer differs from the primary's: status first, then headers, then
/// body (as parsed JSON without the ignored fields where both are JSON and were kept whole;
/// else by length and hash of the first `max_body` bytes).
pub fn judge(cfg: &CompareConfig, primary: &Seen, mirror: &Seen) -> Verdict {
    if primary.status != mirror.status {
        return Verdict::Status;
    }
    if !differing_headers(cfg, &primary.headers, &mirror.headers).is_empty() {
        return Verdict::Headers;
    }
    if let (Some(a), Some(b)) = (&primary.json, &mirror.json) {
        if let (Some(a), Some(b)) = (parse_without(cfg, a), parse_without(cfg, b)) {
            return if a == b {
                Verdict::Match
            } else {
                Verdict::Body
            };
        }
    }
    if primary.length != mirror.length || primary.hash != mirror.hash {
        return Verdict::Body;
    }
    Verdict::Match
}

fn parse_without(cfg: &CompareConfig, body: &[u8]) -> Option<Value> {
    let mut v: Value = serde_json::from_slice(body).ok()?;
    for path in &cfg.ignore_json_fields {
        remove_path(&mut v, path);
    }
    Some(v)
}

/// Removes what `path` names: each segment a key, `*` every element or member.
fn remove_path(v: &mut Value, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        match v {
            Value::Object(m) if first == "*" => m.clear(),
            Value::Object(m) => {
                m.remove(first);
            }
            Value::Array(a) if first == "*" => a.clear(),
            _ => {}
        }
        return;
    }
    match v {
        Value::Object(m) if first == "*" => m.values_mut().for_each(|c| remove_path(c, rest)),
        Value::Object(m) => {
            if let Some(c) = m.get_mut(first) {
                remove_path(c, rest);
            }
        }
        Value::Array(a) if first == "*" => a.iter_mut().for_each(|c| remove_path(c, rest)),
        Value::Array(a) => {
            if let Some(c) = first.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                remove_path(c, rest);
            }
        }
        _ => {}
    }
}

/// A differing pair, as `/mirror/diffs` shows it.
pub struct Diff {
    /// When the request came.
    pub at: SystemTime,
    pub request_id: String,
    pub method: String,
    pub path: String,
    pub route: String,
    pub upstream: String,
    pub verdict: Verdict,
    pub primary: Seen,
    pub mirror: Seen,
}

/// The differing pairs of one mirror, newest first, at most `keep`.
pub struct Kept {
    keep: AtomicUsize,
    list: Mutex<VecDeque<Diff>>,
}

impl Kept {
    pub fn new(keep: usize) -> Kept {
        Kept {
            keep: AtomicUsize::new(keep),
            list: Mutex::new(VecDeque::new()),
        }
    }

    /// Keeps `d` in request order (comparisons end in any order), dropping the oldest.
    pub fn push(&self, d: Diff) {
        let keep = self.keep.load(Relaxed);
        if keep == 0 {
            return;
        }
        let mut list = self.list.lock();
        let at = list.iter().position(|k| k.at <= d.at).unwrap_or(list.len());
        list.insert(at, d);
        list.truncate(keep);
    }

    /// Keeps at most `keep` pairs from now on (a reload changed `compare.keep`).
    pub fn resize(&self, keep: usize) {
        self.keep.store(keep, Relaxed);
        let mut list = self.list.lock();
        list.truncate(keep);
    }

    /// The kept pairs as JSON, headers that differ shown with both values; values of
    /// `redact` headers never shown.
    pub fn render(&self, cfg: &CompareConfig, redact: &[HeaderName]) -> Vec<(SystemTime, Value)> {
        let list = self.list.lock();
        list.iter()
            .map(|d| {
                let headers: Vec<Value> =
                    differing_headers(cfg, &d.primary.headers, &d.mirror.headers)
                        .iter()
                        .map(|n| {
                            json!({
                                "name": n.as_str(),
                                "primary": shown(&d.primary.headers, n, redact),
                                "mirror": shown(&d.mirror.headers, n, redact),
                            })
                        })
                        .collect();
                let side = |s: &Seen| {
                    let mut v = side(s);
                    v["body"] = json!(String::from_utf8_lossy(
                        &s.excerpt[..s.excerpt.len().min(EXCERPT)]
                    ));
                    v
                };
                let mut v = d.summary();
                v["headers"] = json!(headers);
                v["primary"] = side(&d.primary);
                v["mirror"] = side(&d.mirror);
                (d.at, v)
            })
            .collect()
    }

    /// The kept pairs in brief, newest first: what each was about and both statuses.
    pub fn summaries(&self) -> Vec<Value> {
        let list = self.list.lock();
        list.iter()
            .map(|d| {
                let mut v = d.summary();
                v["primary_status"] = json!(d.primary.status);
                v["mirror_status"] = json!(d.mirror.status);
                v
            })
            .collect()
    }

    /// The kept pair of request `request_id` in full, for a side-by-side view: every
    /// header of either answer (those that differ marked, redacted ones as `[redacted]`),
    /// the kept body excerpts, the whole JSON bodies where they were kept, and what the
    /// comparison ignores.
    pub fn detail(
        &self,
        request_id: &str,
        cfg: &CompareConfig,
        redact: &[HeaderName],
    ) -> Option<Value> {
        let list = self.list.lock();
        let d = list.iter().find(|d| d.request_id == request_id)?;
        let differ = differing_headers(cfg, &d.primary.headers, &d.mirror.headers);
        let mut names: Vec<&HeaderName> = d
            .primary
            .headers
            .keys()
            .chain(d.mirror.headers.keys())
            .collect();
        names.sort_by(|x, y| x.as_str().cmp(y.as_str()));
        names.dedup();
        let headers: Vec<Value> = names
            .into_iter()
            .map(|n| {
                let value = |m: &HeaderMap| m.contains_key(n).then(|| shown(m, n, redact));
                json!({
                    "name": n.as_str(),
                    "primary": value(&d.primary.headers),
                    "mirror": value(&d.mirror.headers),
                    "differs": differ.contains(n),
                    "ignored": cfg.ignore_headers.contains(n),
                })
            })
            .collect();
        let body = |s: &Seen| {
            let mut v = side(s);
            v["body"] = json!(String::from_utf8_lossy(&s.excerpt));
            v["complete"] = json!(s.excerpt.len() as u64 == s.length);
            v["json"] = json!(s
                .json
                .as_ref()
                .and_then(|b| serde_json::from_slice::<Value>(b).ok()));
            v
        };
        let mut v = d.summary();
        v["headers"] = json!(headers);
        v["primary"] = body(&d.primary);
        v["mirror"] = body(&d.mirror);
        v["ignore_headers"] = json!(cfg
            .ignore_headers
            .iter()
            .map(|h| h.as_str())
            .collect::<Vec<_>>());
        v["ignore_json_fields"] = json!(cfg
            .ignore_json_fields
            .iter()
            .map(|p| p.join("."))
            .collect::<Vec<_>>());
        Some(v)
    }
}

impl Diff {
    /// What the pair is about, without the answers.
    fn summary(&self) -> Value {
        json!({
            "request_id": self.request_id,
            "time": crate::observe::access_log::timestamp(self.at),
            "method": self.method,
            "path": self.path,
            "route": self.route,
            "upstream": self.upstream,
            "result": self.verdict.label(),
        })
    }
}

/// A header's values as shown to an operator: joined, or `[redacted]`.
fn shown(m: &HeaderMap, n: &HeaderName, redact: &[HeaderName]) -> Value {
    if redact.contains(n) {
        return json!("[redacted]");
    }
    let vs: Vec<String> = m
        .get_all(n)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    json!(vs.join(", "))
}

/// One answer's status, length and hash.
fn side(s: &Seen) -> Value {
    json!({
        "status": s.status,
        "length": s.length,
        "hash": format!("{:016x}", s.hash),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CompareConfig {
        CompareConfig {
            ignore_headers: vec![HeaderName::from_static("x-request-id")],
            ignore_json_fields: vec![
                vec!["meta".into(), "generated_at".into()],
                vec!["items".into(), "*".into(), "id".into()],
            ],
            max_body: 256,
            keep: 2,
        }
    }

    fn seen(
        status: u16,
        headers: &[(&'static str, &'static str)],
        body: &[u8],
        json: bool,
    ) -> Seen {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(*k, v.parse().unwrap());
        }
        let mut d = BodyDigest::new(256, json && is_json(&h));
        for piece in body.chunks(7) {
            d.update(piece);
        }
        d.finish(status, h)
    }

    #[test]
    fn status_then_headers_then_body() {
        let c = cfg();
        let a = seen(200, &[("x-v", "1"), ("x-request-id", "a")], b"same", false);
        assert_eq!(
            judge(
                &c,
                &a,
                &seen(200, &[("x-v", "1"), ("x-request-id", "b")], b"same", false)
            ),
            Verdict::Match
        );
        assert_eq!(
            judge(&c, &a, &seen(500, &[("x-v", "2")], b"other", false)),
            Verdict::Status
        );
        assert_eq!(
            judge(&c, &a, &seen(200, &[("x-v", "2")], b"same", false)),
            Verdict::Headers
        );
        // A header only one side names is not compared.
        assert_eq!(
            judge(&c, &a, &seen(200, &[("x-only", "1")], b"same", false)),
            Verdict::Match
        );
        assert_eq!(
            judge(&c, &a, &seen(200, &[("x-v", "1")], b"samf", false)),
            Verdict::Body
        );
    }

    #[test]
    fn bodies_compare_their_first_max_body_bytes_and_length() {
        let c = cfg();
        let long_a = [b'a'; 300];
        let mut long_b = [b'a'; 300];
        long_b[290] = b'b'; // differs after max_body (256): same hash, same length
        assert_eq!(
            judge(
                &c,
                &seen(200, &[], &long_a, false),
                &seen(200, &[], &long_b, false)
            ),
            Verdict::Match
        );
        assert_eq!(
            judge(
                &c,
                &seen(200, &[], &long_a, false),
                &seen(200, &[], &long_a[..299], false)
            ),
            Verdict::Body
        );
    }

    #[test]
    fn json_compares_parsed_without_ignored_fields() {
        let c = cfg();
        let ct = [("content-type", "application/json")];
        let a = seen(
            200,
            &ct,
            br#"{"a":1,"b":[1,2],"meta":{"generated_at":1},"items":[{"id":1,"n":"x"}]}"#,
            true,
        );
        let reordered = seen(
            200,
            &ct,
            br#"{"items":[{"n":"x","id":9}],"b":[1,2],"meta":{"generated_at":2},"a":1}"#,
            true,
        );
        assert_eq!(judge(&c, &a, &reordered), Verdict::Match);
        let changed = seen(
            200,
            &ct,
            br#"{"a":2,"b":[1,2],"meta":{"generated_at":1},"items":[{"id":1,"n":"x"}]}"#,
            true,
        );
        assert_eq!(judge(&c, &a, &changed), Verdict::Body);
        // Not JSON: bytes decide.
        let text = [("content-type", "text/plain")];
        assert_eq!(
            judge(
                &c,
                &seen(200, &text, b"{\"a\":1,\"b\":2}", true),
                &seen(200, &text, b"{\"b\":2,\"a\":1}", true)
            ),
            Verdict::Body
        );
    }

    #[test]
    fn kept_pairs_are_bounded_newest_first_and_redacted() {
        let c = cfg();
        let kept = Kept::new(2);
        for i in 0..3 {
            kept.push(Diff {
                at: SystemTime::now(),
                request_id: format!("r{i}"),
                method: "GET".into(),
                path: "/x".into(),
                route: "r".into(),
                upstream: "m".into(),
                verdict: Verdict::Headers,
                primary: seen(
                    200,
                    &[("authorization", "secret-a"), ("x-v", "1")],
                    b"p",
                    false,
                ),
                mirror: seen(
                    200,
                    &[("authorization", "secret-b"), ("x-v", "2")],
                    b"m",
                    false,
                ),
            });
        }
        let shown = kept.render(&c, &[header::AUTHORIZATION]);
        assert_eq!(shown.len(), 2);
        assert_eq!(shown[0].1["request_id"], "r2");
        let text = shown[0].1.to_string();
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("[redacted]"), "{text}");
        assert_eq!(shown[0].1["primary"]["body"], "p");
    }
}
