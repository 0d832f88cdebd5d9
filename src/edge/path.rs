//! Request paths are normalised before anything looks at them, as nginx does by default
//! and Envoy with `normalize_path` and `merge_slashes`: otherwise `/public/../admin` matches
//! a `/public/` route and reaches a backend that resolves it to `/admin`, and route-based
//! access control is void.
//!
//! The steps, in order: percent-encoded unreserved characters are decoded (RFC 3986 §2.3)
//! and other escapes written in upper case; an encoded `/` or `\` (or a raw `\`) inside a
//! segment is refused, kept or decoded as `clients.encoded_slashes` says; dot segments are
//! removed (RFC 3986 §5.2.4), refusing a path that climbs above the root; repeated slashes
//! are merged. A segment that is `.` or `..` once its `;` parameters are cut off (`..;`,
//! `.;x`) is refused: Tomcat, Jetty and Spring resolve `/public/..;/admin` as `/admin`,
//! so forwarding it would undo routing as surely as a plain `..`. A path that is already
//! normal costs one scan and no allocation.
//!
//! [`with_path`] puts a new path into a request's URI and keeps the rest (scheme,
//! authority, query): an HTTP/2 request's host lives in that authority.

use crate::config::EncodedSlashes;

/// Why a path was refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// `..` past the root.
    AboveRoot,
    /// An encoded `/` or `\` inside a segment, under the `reject` policy.
    EncodedSlash,
    /// A `.` or `..` segment with path parameters (`..;`), under any encoding.
    DotParameters,
    /// A `%` not followed by two hex digits, or a path that does not start with `/`.
    Malformed,
}

impl PathError {
    pub fn message(self) -> &'static str {
        match self {
            PathError::AboveRoot => "path climbs above the root",
            PathError::EncodedSlash => "encoded slash or backslash in the path",
            PathError::DotParameters => "dot segment with path parameters",
            PathError::Malformed => "malformed path",
        }
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Whether `seg` is `.` or `..` once its path parameters (from the first `;`) are cut off.
fn is_dot_segment(seg: &[u8]) -> bool {
    let bare = seg.split(|&b| b == b';').next().unwrap_or(seg);
    bare == b"." || bare == b".."
}

/// Whether `path` needs no work: no escape, no backslash, no empty or dot segment (with
/// or without parameters).
fn is_normal(path: &[u8]) -> bool {
    if path.first() != Some(&b'/') {
        return false;
    }
    let mut segments = path[1..].split(|&b| b == b'/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if (seg.is_empty() && !last) || is_dot_segment(seg) {
            return false;
        }
        if seg.iter().any(|&b| b == b'%' || b == b'\\') {
            return false;
        }
    }
    true
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Decodes what may be decoded and applies the slash policy.
fn decode(path: &[u8], slashes: EncodedSlashes) -> Result<Vec<u8>, PathError> {
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        let (value, escaped) = if b == b'%' {
            let (Some(hi), Some(lo)) = (
                path.get(i + 1).copied().and_then(hex),
                path.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::Malformed);
            };
            i += 3;
            ((hi << 4) | lo, true)
        } else {
            i += 1;
            (b, false)
        };
        match value {
            b'/' if !escaped => out.push(b'/'),
            b'/' | b'\\' => match slashes {
                EncodedSlashes::Reject => return Err(PathError::EncodedSlash),
                EncodedSlashes::Decode => out.push(b'/'),
                EncodedSlashes::Keep if escaped => push_escape(&mut out, value),
                EncodedSlashes::Keep => out.push(value),
            },
            _ if escaped && unreserved(value) => out.push(value),
            _ if escaped => push_escape(&mut out, value),
            _ => out.push(value),
        }
    }
    Ok(out)
}

fn push_escape(out: &mut Vec<u8>, v: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.extend_from_slice(&[b'%', HEX[(v >> 4) as usize], HEX[(v & 15) as usize]]);
}

/// The normal form of `path`, or `None` when it is normal already.
pub fn normalize(path: &str, slashes: EncodedSlashes) -> Result<Option<String>, PathError> {
    let raw = path.as_bytes();
    if is_normal(raw) {
        return Ok(None);
    }
    if raw.first() != Some(&b'/') {
        // `*` (OPTIONS) and the like have no path to normalise.
        return match raw {
            b"*" => Ok(None),
            _ => Err(PathError::Malformed),
        };
    }
    let decoded = decode(raw, slashes)?;
    let mut stack: Vec<&[u8]> = Vec::new();
    let mut trailing = false;
    let mut segments = decoded[1..].split(|&b| b == b'/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        trailing = false;
        match seg {
            b"" | b"." => trailing = last,
            b".." => {
                if stack.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing = last;
            }
            _ if is_dot_segment(seg) => return Err(PathError::DotParameters),
            _ => stack.push(seg),
        }
    }
    let mut out = Vec::with_capacity(decoded.len());
    for seg in &stack {
        out.push(b'/');
        out.extend_from_slice(seg);
    }
    if out.is_empty() || trailing {
        out.push(b'/');
    }
    // Only ASCII went in and only ASCII-preserving steps were taken, except for decoded
    // escapes of bytes >= 0x80, which are re-escaped: the result is ASCII.
    let out = String::from_utf8(out).map_err(|_| PathError::Malformed)?;
    Ok((out != path).then_some(out))
}

/// `uri` with its path replaced by `path` (already normal), its scheme, authority and
/// query kept. `None` when the result is not a valid URI.
pub fn with_path(uri: &http::Uri, path: &str) -> Option<http::Uri> {
    let mut parts = uri.clone().into_parts();
    let target = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    parts.path_and_query = Some(target.parse().ok()?);
    http::Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, PathError> {
        normalize(p, EncodedSlashes::Reject).map(|o| o.unwrap_or_else(|| p.to_string()))
    }

    #[test]
    fn traversal_variants() {
        let cases: &[(&str, Result<&str, PathError>)] = &[
            ("/", Ok("/")),
            ("/a/b/", Ok("/a/b/")),
            ("/public/../admin/secret", Ok("/admin/secret")),
            ("/public/%2e%2e/admin", Ok("/admin")),
            ("/public/%2E%2E/admin", Ok("/admin")),
            ("/public/.%2e/admin", Ok("/admin")),
            ("/public/..%2fadmin", Err(PathError::EncodedSlash)),
            ("/public/..%2Fadmin", Err(PathError::EncodedSlash)),
            ("/public/..%5cadmin", Err(PathError::EncodedSlash)),
            ("/public/..\\admin", Err(PathError::EncodedSlash)),
            ("/public/./x", Ok("/public/x")),
            ("/public//x", Ok("/public/x")),
            ("//public///x//", Ok("/public/x/")),
            ("/a/b/..", Ok("/a/")),
            ("/a/b/.", Ok("/a/b/")),
            ("/..", Err(PathError::AboveRoot)),
            ("/a/../..", Err(PathError::AboveRoot)),
            ("/%2e%2e/etc/passwd", Err(PathError::AboveRoot)),
            ("/a/%2e%2e/%2e%2e/b", Err(PathError::AboveRoot)),
            ("/%7euser/%41", Ok("/~user/A")),
            ("/a%20b", Ok("/a%20b")),
            ("/a%3fb", Ok("/a%3Fb")),
            ("/a%zz", Err(PathError::Malformed)),
            ("/a%2", Err(PathError::Malformed)),
            ("/...", Ok("/...")),
            ("/a/..b/c", Ok("/a/..b/c")),
            ("/%00", Ok("/%00")),
            // Path parameters on a dot segment: `..;` is `..` to Tomcat, Jetty and Spring.
            ("/public/..;/admin/secret", Err(PathError::DotParameters)),
            ("/public/%2e%2e;/admin/x", Err(PathError::DotParameters)),
            (
                "/public/%2E%2E;jsessionid=1/admin",
                Err(PathError::DotParameters),
            ),
            ("/public/.%2e;/admin", Err(PathError::DotParameters)),
            ("/public/.;/admin", Err(PathError::DotParameters)),
            ("/public/..;", Err(PathError::DotParameters)),
            ("/..;/etc/passwd", Err(PathError::DotParameters)),
            ("/public/..;a=b;c/admin", Err(PathError::DotParameters)),
            ("/public/x;..", Ok("/public/x;..")),
            ("/public/..x;/y", Ok("/public/..x;/y")),
            ("/public/a;b/c", Ok("/public/a;b/c")),
            ("/public/..%3b/admin", Ok("/public/..%3B/admin")),
        ];
        for (input, want) in cases {
            assert_eq!(norm(input).as_deref().map_err(|e| *e), *want, "{input}");
        }
    }

    #[test]
    fn encoded_slash_policies() {
        let keep = normalize("/a%2fb/../c", EncodedSlashes::Keep);
        assert_eq!(keep, Ok(Some("/c".to_string())));
        let keep = normalize("/a%2fb/c", EncodedSlashes::Keep);
        assert_eq!(keep, Ok(Some("/a%2Fb/c".to_string())));
        let decode = normalize("/a%2fb/../c", EncodedSlashes::Decode);
        assert_eq!(decode, Ok(Some("/a/c".to_string())));
        let decode = normalize("/a%5C..%5C..%5Cb", EncodedSlashes::Decode);
        assert_eq!(decode, Err(PathError::AboveRoot));
    }

    #[test]
    fn with_path_keeps_the_authority_and_query() {
        let uri: http::Uri = "http://routed.example/a/./b?x=1".parse().unwrap();
        let new = with_path(&uri, "/a/b").unwrap();
        assert_eq!(new.to_string(), "http://routed.example/a/b?x=1");
        let origin: http::Uri = "/p/q".parse().unwrap();
        assert_eq!(with_path(&origin, "/q").unwrap().to_string(), "/q");
    }

    #[test]
    fn normal_paths_are_left_alone() {
        for p in ["/", "/a", "/a/b/", "/a.b/c..d", "/x-y_z~"] {
            assert_eq!(normalize(p, EncodedSlashes::Reject), Ok(None), "{p}");
        }
    }
}
