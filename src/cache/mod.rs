//! The response cache: RFC 9111 as a shared cache, on Pingora's cache phases and
//! `pingora-cache`'s machinery (cache lock, revalidation, stale serving, eviction), with the
//! answers held in [`store::Store`] and their total bounded by `cache.max_size`.
//!
//! What is decided here, for the proxy's cache phases to call:
//! - whether a request may use the cache ([`Cache::enable`]): a route with `cache:`, GET or
//!   HEAD, and no `Cache-Control: no-store` from the client;
//! - its key ([`key`]): the route, the host, the path and the query (a HEAD shares its
//!   GET's entry; Pingora fetches a GET for it);
//! - whether an answer may be stored and for how long ([`cacheable`]): its `Cache-Control`
//!   (`no-store`, `private`, `no-cache`, `max-age`, `s-maxage`, `must-revalidate`,
//!   `stale-while-revalidate`, `stale-if-error`) and `Expires` through `pingora-cache`'s
//!   filters; an answer to a request with `Authorization` only when its directives allow it;
//!   `Vary: *` and `Set-Cookie` never; the route's `ttl` only for answers that state no
//!   freshness and whose status is cacheable by default (RFC 9110 §15.1);
//! - the variant an answer with `Vary` is stored under ([`variance`]);
//! - when a stale entry may be served ([`stale_allowed`]): within the answer's (or the
//!   route's) `stale-if-error` window when the upstream fails, and within
//!   `stale-while-revalidate` while one request refreshes it in the background;
//! - what the client is told (`X-Cache`, [`Outcome`]).

pub mod freshness;
pub mod store;

use std::time::{Duration, SystemTime};

use http::{header, Method, StatusCode};
use pingora_cache::cache_control::{CacheControl, InterpretCacheControl};
use pingora_cache::eviction::lru;
use pingora_cache::eviction::EvictionManager;
use pingora_cache::filters::{calculate_serve_stale_durations, resp_cacheable};
use pingora_cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora_cache::{
    CacheKey, CacheMeta, CacheMetaDefaults, CachePhase, NoCacheReason, RespCacheable,
    VarianceBuilder,
};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;

use crate::config::RouteCacheConfig;
use store::Store;

/// How long a request waits for another one filling the same entry before it goes upstream
/// itself, and how long a fill may hold the lock.
const LOCK_TIMEOUT: Duration = Duration::from_secs(3);

/// The process's cache: storage, eviction and the fill lock. Pingora's cache phases take
/// `'static` references, so it is built once at start-up and never freed.
pub struct Cache {
    pub store: &'static Store,
    pub eviction: &'static lru::Manager<16>,
    lock: &'static CacheKeyLockImpl,
    pub max_size: u64,
}

impl Cache {
    pub fn new(max_size: u64) -> Cache {
        let eviction = lru::Manager::<16>::with_capacity(max_size as usize, 64 * 1024);
        Cache {
            store: Box::leak(Box::new(Store::new())),
            eviction: Box::leak(Box::new(eviction)),
            lock: Box::leak(Box::new(CacheLock::new(LOCK_TIMEOUT))),
            max_size,
        }
    }

    /// Turns the cache on for this request, if it may use it.
    pub fn enable(&self, session: &mut Session, route: &RouteCacheConfig) {
        let req = session.req_header();
        if !matches!(req.method, Method::GET | Method::HEAD) {
            return;
        }
        if CacheControl::from_req_headers(req).is_some_and(|cc| cc.no_store()) {
            return;
        }
        session
            .cache
            .enable(self.store, Some(self.eviction), None, Some(self.lock), None);
        session
            .cache
            .set_max_file_size_bytes(route.max_object_size as usize);
    }

    /// Bytes of answers held.
    pub fn size(&self) -> u64 {
        self.eviction.total_size() as u64
    }

    /// Entries evicted so far to stay under `max_size`.
    pub fn evictions(&self) -> u64 {
        self.eviction.evicted_items() as u64
    }

    /// Purges every entry (`host` and `path` absent), or those of one host and path (with
    /// every variant and query); returns how many went.
    pub fn purge(&self, host: Option<&str>, path: Option<&str>) -> usize {
        match (host, path) {
            (None, None) => self.store.purge_where(self.eviction, |_| true),
            (host, path) => self.store.purge_where(self.eviction, |primary| {
                let Some((h, target)) = split_primary(primary) else {
                    return false;
                };
                let p = target.split('?').next().unwrap_or(target);
                host.is_none_or(|want| same_host(want, h)) && path.is_none_or(|want| want == p)
            }),
        }
    }
}

impl Cache {
    /// Invalidates what is stored for `target` on `host` under each of `routes` (every
    /// variant), as a successful unsafe request asks (RFC 9111 4.4); returns how many went.
    pub fn invalidate<'a>(
        &self,
        routes: impl Iterator<Item = &'a str>,
        host: &str,
        target: &str,
    ) -> usize {
        routes
            .map(|route| {
                let primary = format!("{route}\0{host}\0{target}");
                self.store.purge_primary(self.eviction, primary.as_bytes())
            })
            .sum()
    }
}

/// The targets an unsafe request's successful answer invalidates besides its own (RFC 9111
/// 4.4): its `Location` and `Content-Location`, when they name the same host (or no host).
pub fn also_invalidated(resp: &ResponseHeader, host: &str) -> Vec<String> {
    [header::LOCATION, header::CONTENT_LOCATION]
        .iter()
        .filter_map(|name| resp.headers.get(name)?.to_str().ok())
        .filter_map(|value| {
            let uri: http::Uri = value.parse().ok()?;
            let same = uri
                .authority()
                .is_none_or(|a| a.as_str().eq_ignore_ascii_case(host));
            let target = uri.path_and_query()?.as_str();
            (same && target.starts_with('/')).then(|| target.to_string())
        })
        .collect()
}

/// The key of a request on a cached route: route, host and target, framed by NUL bytes
/// (which none of them can hold).
pub fn key(route: &str, req: &RequestHeader) -> CacheKey {
    let host = crate::keys::request_host(req).unwrap_or("");
    let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
    CacheKey::new(format!("{route}\0{host}\0{target}"), "")
}

/// Whether a purge's `host` names a stored host: equal, ignoring case, and ignoring the
/// stored port when the purge names none.
fn same_host(want: &str, stored: &str) -> bool {
    if want.eq_ignore_ascii_case(stored) {
        return true;
    }
    let bare = match stored.rsplit_once(':') {
        Some((h, port)) if !want.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => return false,
    };
    want.eq_ignore_ascii_case(bare)
}

/// The host and target a primary key was made from.
fn split_primary(primary: &[u8]) -> Option<(&str, &str)> {
    let text = std::str::from_utf8(primary).ok()?;
    let mut parts = text.splitn(3, '\0');
    let _route = parts.next()?;
    Some((parts.next()?, parts.next()?))
}

/// No freshness by default: only what the answer states (the route's `ttl` is applied
/// separately, since `pingora-cache` takes a plain function here).
fn no_heuristic(_: StatusCode) -> Option<Duration> {
    None
}

/// The statuses RFC 9110 §15.1 calls heuristically cacheable, for the route's `ttl`.
fn heuristic(status: StatusCode) -> Option<Duration> {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 206 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
    .then_some(Duration::from_secs(1))
}

/// Whether (and until when) an answer may be stored for this request. The decision reads
/// the targeted field (RFC 9213) in place of `Cache-Control` when there is one; the entry
/// keeps the answer's own header fields, and is dated by the answer's age on arrival
/// ([`freshness`]).
pub fn cacheable(
    route: &RouteCacheConfig,
    req: &RequestHeader,
    resp: &ResponseHeader,
) -> RespCacheable {
    let refuse = RespCacheable::Uncacheable(NoCacheReason::OriginNotCache);
    let vary_star = resp.headers.get_all(header::VARY).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii() == b"*")
    });
    if vary_star || resp.headers.contains_key(header::SET_COOKIE) {
        return refuse;
    }
    let decisive = freshness::decisive(resp);
    let deciding = decisive.as_ref().unwrap_or(resp);
    let canonical = freshness::canonical_expires(deciding);
    let deciding = canonical.as_ref().unwrap_or(deciding);
    let cc = CacheControl::from_resp_headers(deciding);
    let authorized = req.headers.contains_key(header::AUTHORIZATION);
    let swr = route.stale_while_revalidate.as_secs() as u32;
    let sie = route.stale_if_error.as_secs() as u32;
    let stated = CacheMetaDefaults::new(no_heuristic, swr, sie);
    let now = SystemTime::now();
    let age = freshness::initial_age(resp, now);
    let lifetime = match resp_cacheable(cc.as_ref(), deciding.clone(), authorized, &stated) {
        RespCacheable::Cacheable(_) => freshness::lifetime(cc.as_ref(), deciding, now),
        RespCacheable::Uncacheable(reason) => {
            // Nothing stated: the route's ttl, where the answer allows storing at all.
            let Some(ttl) = route.ttl else {
                return RespCacheable::Uncacheable(reason);
            };
            let fallback = CacheMetaDefaults::new(heuristic, swr, sie);
            match resp_cacheable(cc.as_ref(), deciding.clone(), authorized, &fallback) {
                RespCacheable::Cacheable(_) => Some(ttl),
                other => return other,
            }
        }
    };
    let Some(lifetime) = lifetime else {
        return refuse;
    };
    let (fresh_until, created) = freshness::window(now, age, lifetime);
    let (swr, sie) = calculate_serve_stale_durations(cc.as_ref(), &stated);
    let mut stored = resp.clone();
    if let Some(cc) = &cc {
        cc.strip_private_headers(&mut stored);
    }
    RespCacheable::Cacheable(CacheMeta::new(fresh_until, created, swr, sie, stored))
}

/// The answer a 304 revalidated, with every field the 304 carries put in place of the
/// stored ones (RFC 9111 4.3.4), except the framing and hop-by-hop fields (3.2).
/// `pingora-cache`'s own merge takes only the caching fields and `ETag`.
pub fn refreshed(merged: &ResponseHeader, not_modified: &http::HeaderMap) -> ResponseHeader {
    let mut out = merged.clone();
    let kept = |name: &http::HeaderName| {
        matches!(
            name.as_str(),
            "content-length"
                | "transfer-encoding"
                | "connection"
                | "keep-alive"
                | "te"
                | "trailer"
                | "upgrade"
                | "proxy-connection"
                | "x-cache"
        )
    };
    // A stored answer the gateway compressed carries the weak form of the origin's tag:
    // the 304's strong tag names the identity bytes, never these (a range or conditional
    // request could otherwise mix the two).
    let weakened = |name: &http::HeaderName| {
        *name == header::ETAG
            && merged.headers.get(header::ETAG).is_some_and(|stored| {
                not_modified.get(header::ETAG).is_some_and(|new| {
                    stored.as_bytes().strip_prefix(b"W/") == Some(new.as_bytes())
                })
            })
    };
    for name in not_modified.keys() {
        if kept(name) || weakened(name) {
            continue;
        }
        out.remove_header(name);
        for value in not_modified.get_all(name) {
            let _ = out.append_header(name.clone(), value.clone());
        }
    }
    out
}

/// The variant key of a request for an answer that names `Vary` headers. `coding`: on a
/// route that compresses, the coding this request gets, which stands for its
/// `Accept-Encoding`.
pub fn variance(meta: &CacheMeta, req: &RequestHeader, coding: Option<&str>) -> Option<[u8; 16]> {
    let mut names: Vec<String> = crate::http::headers::list(meta.headers(), header::VARY)
        .map(str::to_ascii_lowercase)
        .collect();
    if names.is_empty() {
        return None;
    }
    names.sort();
    names.dedup();
    let values: Vec<Vec<u8>> = names
        .iter()
        .map(|n| match coding {
            Some(c) if n == "accept-encoding" => c.as_bytes().to_vec(),
            // Members compared without the whitespace around them (RFC 9111 4.1: values
            // normalised as the field's syntax allows): `en, fr` and `en,fr` are one variant.
            _ => {
                let values = req.headers.get_all(n.as_str());
                let members = values
                    .iter()
                    .flat_map(|v| v.as_bytes().split(|b| *b == b','));
                let members: Vec<Vec<u8>> = members.map(tight).collect();
                members.join(&b","[..])
            }
        })
        .collect();
    let mut b = VarianceBuilder::new();
    for (name, value) in names.iter().zip(&values) {
        b.add_value(name, value);
    }
    b.finalize()
}

/// A list member without the optional whitespace around it and around its `;` and `=`
/// (`fr; q=0.5` → `fr;q=0.5`); whitespace inside a value stays.
fn tight(member: &[u8]) -> Vec<u8> {
    let member = member.trim_ascii();
    let mut out: Vec<u8> = Vec::with_capacity(member.len());
    let mut pending_space = false;
    for &b in member {
        match b {
            b' ' | b'\t' => pending_space = true,
            b';' | b'=' => {
                out.push(b);
                pending_space = false;
            }
            _ => {
                if pending_space && !matches!(out.last(), Some(b';' | b'=') | None) {
                    out.push(b' ');
                }
                out.push(b);
                pending_space = false;
            }
        }
    }
    out
}

/// Whether a stale entry may be served: while it is revalidated (`error` is `None`), or
/// when the upstream failed (not when the client did). The windows themselves are checked
/// by `pingora-cache` against the entry.
pub fn stale_allowed(error: Option<&pingora_error::Error>) -> bool {
    error.is_none_or(|e| *e.esource() != pingora_error::ErrorSource::Downstream)
}

/// Whether the client asked for a fresh answer (`Cache-Control: no-cache` or `max-age=0`,
/// or `Pragma: no-cache`): a hit is then revalidated first.
pub fn client_wants_fresh(req: &RequestHeader) -> bool {
    let cc = CacheControl::from_req_headers(req);
    cc.as_ref()
        .is_some_and(|cc| cc.no_cache() || cc.max_age().ok().flatten() == Some(0))
        || (cc.is_none()
            && req
                .headers
                .get(header::PRAGMA)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"no-cache")))
}

/// What the cache did for an answer on a cached route, from the cache's `phase`
/// (`looked_up`: its key was computed, so a later "bypass" means the answer could not be
/// stored, a miss): counted in `results` (by [`Outcome::index`]) and told in `X-Cache`.
pub(crate) fn report(
    phase: CachePhase,
    looked_up: bool,
    results: &[prometheus::IntCounter],
    resp: &mut ResponseHeader,
) -> pingora_error::Result<Outcome> {
    let outcome = match Outcome::of(phase) {
        Outcome::Bypass if looked_up => Outcome::Miss,
        outcome => outcome,
    };
    if let Some(counter) = results.get(outcome.index()) {
        counter.inc();
    }
    resp.insert_header("x-cache", outcome.header())?;
    Ok(outcome)
}

/// What the cache did for a request, as `X-Cache` says it and the metrics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Stale,
    Expired,
    Revalidated,
    Bypass,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Hit,
        Outcome::Miss,
        Outcome::Stale,
        Outcome::Expired,
        Outcome::Revalidated,
        Outcome::Bypass,
    ];

    pub fn of(phase: CachePhase) -> Outcome {
        match phase {
            CachePhase::Hit => Outcome::Hit,
            CachePhase::Miss => Outcome::Miss,
            CachePhase::Stale | CachePhase::StaleUpdating => Outcome::Stale,
            CachePhase::Expired => Outcome::Expired,
            CachePhase::Revalidated | CachePhase::RevalidatedNoCache(_) => Outcome::Revalidated,
            _ => Outcome::Bypass,
        }
    }

    /// The `X-Cache` value.
    pub fn header(self) -> &'static str {
        match self {
            Outcome::Hit => "HIT",
            Outcome::Miss => "MISS",
            Outcome::Stale => "STALE",
            Outcome::Expired => "EXPIRED",
            Outcome::Revalidated => "REVALIDATED",
            Outcome::Bypass => "BYPASS",
        }
    }

    /// The metric label and access-log value.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Stale => "stale",
            Outcome::Expired => "expired",
            Outcome::Revalidated => "revalidated",
            Outcome::Bypass => "bypass",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(ttl: Option<u64>) -> RouteCacheConfig {
        RouteCacheConfig {
            ttl: ttl.map(Duration::from_secs),
            max_object_size: 1 << 20,
            stale_if_error: Duration::from_secs(300),
            stale_while_revalidate: Duration::ZERO,
        }
    }

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/x", None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn resp(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
        let mut r = ResponseHeader::build(status, None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn fresh_for(c: RespCacheable) -> Option<i64> {
        match c {
            RespCacheable::Cacheable(m) => {
                Some(match m.fresh_until().duration_since(SystemTime::now()) {
                    Ok(d) => d.as_secs() as i64 + 1,
                    Err(_) => 0,
                })
            }
            RespCacheable::Uncacheable(_) => None,
        }
    }

    #[test]
    fn a_304_keeps_the_weak_tag_of_a_compressed_entry() {
        let mut stored = ResponseHeader::build(200, None).unwrap();
        stored.insert_header("etag", "W/\"v1\"").unwrap();
        stored.insert_header("content-encoding", "gzip").unwrap();
        let mut fields = http::HeaderMap::new();
        fields.insert("etag", "\"v1\"".parse().unwrap());
        fields.insert("x-version", "2".parse().unwrap());
        let out = refreshed(&stored, &fields);
        assert_eq!(out.headers["etag"], "W/\"v1\"");
        assert_eq!(out.headers["x-version"], "2");
        // Another tag is the origin's news: taken as it comes.
        fields.insert("etag", "\"v2\"".parse().unwrap());
        assert_eq!(refreshed(&stored, &fields).headers["etag"], "\"v2\"");
    }

    #[test]
    fn list_members_lose_only_optional_whitespace() {
        assert_eq!(tight(b" fr ;  q = 0.5 "), b"fr;q=0.5".to_vec());
        assert_eq!(tight(b"en-US"), b"en-US".to_vec());
        assert_eq!(tight(b"Mozilla/5.0 (X11)"), b"Mozilla/5.0 (X11)".to_vec());
    }

    #[test]
    fn rfc_9111_decides_what_is_stored() {
        let r = route(None);
        let get = req(&[]);
        assert_eq!(
            fresh_for(cacheable(
                &r,
                &get,
                &resp(200, &[("cache-control", "max-age=60")])
            )),
            Some(60)
        );
        assert_eq!(
            fresh_for(cacheable(
                &r,
                &get,
                &resp(200, &[("cache-control", "s-maxage=30, max-age=60")])
            )),
            Some(30)
        );
        assert_eq!(
            fresh_for(cacheable(
                &r,
                &get,
                &resp(200, &[("cache-control", "no-store, max-age=60")])
            )),
            None
        );
        assert_eq!(
            fresh_for(cacheable(
                &r,
                &get,
                &resp(200, &[("cache-control", "private, max-age=60")])
            )),
            None
        );
        assert_eq!(
            fresh_for(cacheable(&r, &get, &resp(200, &[]))),
            None,
            "nothing stated, no ttl"
        );
        assert_eq!(
            fresh_for(cacheable(
                &r,
                &get,
                &resp(200, &[("vary", "*"), ("cache-control", "max-age=60")])
            )),
            None
        );
        assert_eq!(
            fresh_for(cacheable(
                &r,
                &get,
                &resp(
                    200,
                    &[("set-cookie", "a=b"), ("cache-control", "max-age=60")]
                )
            )),
            None
        );
        let auth = req(&[("authorization", "Bearer x")]);
        assert_eq!(
            fresh_for(cacheable(
                &r,
                &auth,
                &resp(200, &[("cache-control", "max-age=60")])
            )),
            None
        );
        assert_eq!(
            fresh_for(cacheable(
                &r,
                &auth,
                &resp(200, &[("cache-control", "public, max-age=60")])
            )),
            Some(60)
        );
        // The route's ttl: only for answers that state nothing, and cacheable statuses.
        let r = route(Some(90));
        assert_eq!(fresh_for(cacheable(&r, &get, &resp(200, &[]))), Some(90));
        assert_eq!(
            fresh_for(cacheable(
                &r,
                &get,
                &resp(200, &[("cache-control", "max-age=5")])
            )),
            Some(5)
        );
        assert_eq!(fresh_for(cacheable(&r, &get, &resp(500, &[]))), None);
        assert_eq!(
            fresh_for(cacheable(
                &r,
                &get,
                &resp(200, &[("cache-control", "no-store")])
            )),
            None
        );
    }

    #[test]
    fn variants_follow_the_named_request_headers() {
        let meta = match cacheable(
            &route(None),
            &req(&[]),
            &resp(
                200,
                &[("cache-control", "max-age=60"), ("vary", "Accept-Encoding")],
            ),
        ) {
            RespCacheable::Cacheable(m) => m,
            RespCacheable::Uncacheable(r) => panic!("{r:?}"),
        };
        let gzip = variance(&meta, &req(&[("accept-encoding", "gzip")]), None);
        let br = variance(&meta, &req(&[("accept-encoding", "br")]), None);
        let none = variance(&meta, &req(&[]), None);
        assert!(gzip.is_some() && br.is_some() && none.is_some());
        assert_ne!(gzip, br);
        assert_ne!(gzip, none);
        assert_eq!(
            gzip,
            variance(
                &meta,
                &req(&[("accept-encoding", "gzip"), ("x-other", "1")]),
                None
            )
        );
        // On a compressing route, the coding a request gets is its variant: two texts of
        // Accept-Encoding that get gzip share one.
        let a = variance(
            &meta,
            &req(&[("accept-encoding", "gzip, deflate")]),
            Some("gzip"),
        );
        let b = variance(
            &meta,
            &req(&[("accept-encoding", "gzip;q=1")]),
            Some("gzip"),
        );
        assert_eq!(a, b);
        assert_ne!(a, variance(&meta, &req(&[]), Some("identity")));
    }

    #[test]
    fn a_purge_by_host_and_path_finds_its_keys() {
        let k = key("r", &{
            let mut r = RequestHeader::build("GET", b"/a/b?x=1", None).unwrap();
            r.insert_header("host", "example.com").unwrap();
            r
        });
        let (host, target) = split_primary(k.primary_key()).unwrap();
        assert_eq!((host, target), ("example.com", "/a/b?x=1"));
        assert!(same_host("Example.com", "example.com:8080"));
        assert!(same_host("example.com:8080", "example.com:8080"));
        assert!(!same_host("example.com:81", "example.com:8080"));
        assert!(!same_host("example.co", "example.com"));
    }
}
