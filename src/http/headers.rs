//! Header field helpers shared by the features: `Vary`, and the comma-separated lists
//! many fields are (RFC 9110 5.6.1).

use http::header;
use pingora_http::ResponseHeader;

/// Adds `name` (a static header name as written, e.g. `Accept-Encoding`) to the answer's
/// `Vary`, unless it is named there already or `Vary` is `*`.
pub fn add_vary(resp: &mut ResponseHeader, name: &'static str) {
    let present = resp
        .headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            let t = t.trim();
            t == "*" || t.eq_ignore_ascii_case(name)
        });
    if !present {
        let _ = resp.append_header(header::VARY, http::HeaderValue::from_static(name));
    }
}

/// The elements of a comma-separated field value, trimmed, empty ones skipped (RFC 9110
/// 5.6.1: a recipient accepts empty elements).
pub fn comma_list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|t| !t.is_empty())
}
