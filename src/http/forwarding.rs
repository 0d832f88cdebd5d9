//! What the gateway changes in a request on its way upstream and in the answer on its way
//! back: `X-Forwarded-For` (appended), `X-Forwarded-Proto`, `X-Request-Id`, the removal of
//! hop-by-hop headers (`Connection` and the headers it names, `Keep-Alive`, `TE`,
//! `Trailer`, `Upgrade`, `Proxy-*`), a route's `strip_prefix`, and its
//! `request_headers` / `response_headers` rules.

use http::header::{self, HeaderName};
use http::Uri;
use pingora_error::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};

use super::client::{self, Client};
use super::headers;
use super::passage::Passage;
use super::request_id;
use crate::config::{HeaderRules, MirrorConfig, PathMatch, RouteConfig};

/// Hop-by-hop headers that are never forwarded, besides those `Connection` names and the
/// `Proxy-*` family.
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// A request to switch protocols (`Connection: upgrade` and `Upgrade`, e.g. WebSocket).
pub fn is_upgrade(req: &RequestHeader) -> bool {
    req.headers.contains_key(header::UPGRADE)
        && headers::list_has(&req.headers, header::CONNECTION, "upgrade")
}

/// Names of the headers to drop from `headers` as hop-by-hop: one pass over the names, no
/// allocation unless there is something to drop (this runs twice per request).
fn hop_by_hop(headers: &http::HeaderMap) -> Vec<HeaderName> {
    let named = |name: &str| headers::list_has(headers, header::CONNECTION, name);
    headers
        .keys()
        .filter(|k| HOP_BY_HOP.contains(k) || k.as_str().starts_with("proxy-") || named(k.as_str()))
        .cloned()
        .collect()
}

fn apply_rules_req(req: &mut RequestHeader, rules: &HeaderRules) -> Result<()> {
    for name in &rules.remove {
        req.remove_header(name);
    }
    for (name, value) in &rules.set {
        req.insert_header(name.clone(), value.clone())?;
    }
    Ok(())
}

/// The URI a route with `strip_prefix` sends upstream: the prefix removed, a leading `/`
/// kept, the query and the authority (an h2 request's host) untouched.
pub fn stripped_uri(uri: &Uri, prefix: &str) -> Option<Uri> {
    let rest = uri.path().strip_prefix(prefix)?;
    if rest.starts_with('/') {
        crate::edge::path::with_path(uri, rest)
    } else {
        crate::edge::path::with_path(uri, &format!("/{rest}"))
    }
}

/// Drops hop-by-hop headers and adds `X-Forwarded-For` / `X-Forwarded-Proto`.
fn forwarded(req: &mut RequestHeader, client: &Client) -> Result<()> {
    for name in hop_by_hop(&req.headers) {
        req.remove_header(&name);
    }
    match client::forwarded_for(client, &req.headers) {
        Some(value) => req.insert_header("x-forwarded-for", value)?,
        None => {
            req.remove_header("x-forwarded-for");
        }
    }
    // A static value: nothing to copy per request.
    let proto = crate::config::Scheme::of(client.https).as_str();
    req.insert_header("x-forwarded-proto", http::HeaderValue::from_static(proto))?;
    Ok(())
}

/// Shapes the request that goes to a backend. `path`: the path a route's `rewrite` made
/// of this request's (already normalised), sent instead of its own.
pub fn upstream_request(
    req: &mut RequestHeader,
    route: &RouteConfig,
    pass: &Passage,
    request_id: &str,
) -> Result<()> {
    let (client, path) = (&pass.client, pass.upstream_path.as_deref());
    // An upgrade goes on as one: its hop-by-hop `Upgrade` is what the backend must see.
    let upgrade = is_upgrade(req)
        .then(|| req.headers.get(header::UPGRADE).cloned())
        .flatten();
    // `TE: trailers` says the client takes trailers (gRPC needs it); h2 allows that value
    // alone (RFC 9113 §8.2.2), and it stays true through the gateway.
    let trailers = headers::list_has(&req.headers, header::TE, "trailers");
    forwarded(req, client)?;
    if let Some(protocol) = upgrade {
        req.insert_header(header::CONNECTION, "upgrade")?;
        req.insert_header(header::UPGRADE, protocol)?;
    }
    if trailers {
        req.insert_header(header::TE, "trailers")?;
    }
    if let Some(path) = path {
        match crate::edge::path::with_path(&req.uri, path) {
            Some(uri) => req.set_uri(uri),
            None => {
                return Error::e_explain(ErrorType::InternalError, "rewrite made an invalid path")
            }
        }
    } else if let (true, PathMatch::Prefix(prefix)) = (route.strip_prefix, &route.path) {
        if let Some(uri) = stripped_uri(&req.uri, prefix) {
            req.set_uri(uri);
        } else {
            return Error::e_explain(
                ErrorType::InternalError,
                "strip_prefix produced an invalid path",
            );
        }
    }
    apply_rules_req(req, &route.request_headers)?;
    req.insert_header(request_id::HEADER, request_id)?;
    pass.trace.propagate(req)
}

/// Shapes a mirror copy: the client's method, path, query, Host and headers as received
/// (no route rewriting), forwarding headers, minus `redact_headers`, plus the mirror's
/// `headers` rules, and the primary's `X-Request-Id`.
pub fn mirror_request(
    req: &mut RequestHeader,
    mirror: &MirrorConfig,
    pass: &Passage,
    request_id: &str,
) -> Result<()> {
    redacted_copy(req, &mirror.redact_headers, &pass.client)?;
    apply_rules_req(req, &mirror.headers)?;
    req.insert_header(request_id::HEADER, request_id)?;
    pass.trace.propagate(req)
}

/// What every copy of a client's request starts from: forwarding headers, and none of the
/// `redact` headers.
fn redacted_copy(req: &mut RequestHeader, redact: &[HeaderName], client: &Client) -> Result<()> {
    forwarded(req, client)?;
    for name in redact {
        req.remove_header(name);
    }
    as_http11(req)
}

/// A copy goes out over HTTP/1.1 whatever the client spoke: an h2 request's authority
/// becomes its `Host`.
pub fn as_http11(req: &mut RequestHeader) -> Result<()> {
    req.set_version(http::Version::HTTP_11);
    if !req.headers.contains_key(header::HOST) {
        if let Some(authority) = req.uri.authority().map(|a| a.as_str().to_string()) {
            req.insert_header(header::HOST, authority)?;
        }
    }
    Ok(())
}

/// Shapes a broadcast copy: the client's request as received, forwarding headers, minus
/// the route's `redact_headers`, with the request id and a `Content-Length` for the body
/// that was read in full.
pub fn broadcast_request(
    req: &mut RequestHeader,
    route: &RouteConfig,
    pass: &Passage,
    request_id: &str,
    body_len: usize,
) -> Result<()> {
    redacted_copy(req, &route.redact_headers, &pass.client)?;
    req.remove_header(&header::TRANSFER_ENCODING);
    req.insert_header(header::CONTENT_LENGTH, body_len.to_string())?;
    req.insert_header(request_id::HEADER, request_id)?;
    // Stored with the request: a delivery made an hour later still joins its trace.
    pass.trace.propagate(req)
}

/// Shapes the answer that goes back to the client.
pub fn response(
    resp: &mut ResponseHeader,
    route: Option<&RouteConfig>,
    request_id: &str,
) -> Result<()> {
    if resp.status != http::StatusCode::SWITCHING_PROTOCOLS {
        for name in hop_by_hop(&resp.headers) {
            // Pingora writes the client connection's own Connection header.
            if name != header::CONNECTION {
                resp.remove_header(&name);
            }
        }
    }
    if let Some(route) = route {
        for name in &route.response_headers.remove {
            resp.remove_header(name);
        }
        for (name, value) in &route.response_headers.set {
            resp.insert_header(name.clone(), value.clone())?;
        }
    }
    resp.insert_header(request_id::HEADER, request_id)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_prefix_keeps_a_leading_slash_and_the_query() {
        let s = |u: &str, p: &str| stripped_uri(&u.parse().unwrap(), p).unwrap().to_string();
        assert_eq!(s("/api/users?id=1", "/api"), "/users?id=1");
        assert_eq!(s("/api", "/api"), "/");
        assert_eq!(s("/apix", "/api"), "/x");
        assert_eq!(s("/api/", "/api/"), "/");
    }

    #[test]
    fn hop_by_hop_includes_connection_tokens_and_proxy_headers() {
        let mut h = http::HeaderMap::new();
        h.insert("connection", "close, X-Secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("proxy-authorization", "x".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        let names = hop_by_hop(&h);
        for n in [
            "x-secret",
            "proxy-authorization",
            "keep-alive",
            "connection",
        ] {
            assert!(names.iter().any(|h| h == n), "{n} missing from {names:?}");
        }
        assert!(!names.iter().any(|h| h == "x-kept"));
    }
}
