//! Header field helpers shared by the features: the comma-separated lists many fields are
//! (RFC 9110 5.6.1), `Vary`, a request's cookies (RFC 6265 5.4) and query parameters.

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

/// The value of the cookie `name` in the request's `Cookie` fields (RFC 6265 5.4: `name=value`
/// pairs separated by `; `; HTTP/2 may split them over several fields), the first if sent
/// twice.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            let value = pair[eq + 1..].trim_ascii();
            let value = value
                .strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(value);
            (pair[..eq].trim_ascii() == name.as_bytes()).then_some(value)
        })
}

/// The value of the query parameter `name`, percent-decoded (`+` as a space), the first if
/// given twice.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The value of the query parameter `name` as sent (not decoded), the first if given twice:
/// a key read without allocating.
pub fn query_raw<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}
