//! Header field helpers shared by the features: the comma-separated lists many fields are
//! (RFC 9110 5.6.1), and `Vary`.

use http::header::{self, AsHeaderName};
use http::HeaderMap;
use pingora_http::ResponseHeader;

/// The elements of every `name` field line in `headers`, trimmed, empty ones skipped (RFC
/// 9110 5.6.1: a recipient accepts empty elements); a line that is not text is skipped.
pub fn list(headers: &HeaderMap, name: impl AsHeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Whether the `name` list in `headers` holds `token` (in any letter case).
pub fn list_has(headers: &HeaderMap, name: impl AsHeaderName, token: &str) -> bool {
    list(headers, name).any(|t| t.eq_ignore_ascii_case(token))
}

/// Adds `name` (a static header name as written, e.g. `Accept-Encoding`) to the answer's
/// `Vary`, unless it is named there already or `Vary` is `*`.
pub fn add_vary(resp: &mut ResponseHeader, name: &'static str) {
    let present =
        list(&resp.headers, header::VARY).any(|t| t == "*" || t.eq_ignore_ascii_case(name));
    if !present {
        let _ = resp.append_header(header::VARY, http::HeaderValue::from_static(name));
    }
}
