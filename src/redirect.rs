//! Redirect routes (`redirect: { to, status }`): the gateway answers with `Location` built
//! from a template whose `{scheme}`, `{host}` (the request's host, without its port),
//! `{path}` (normalised) and `{query}` (the query with its `?`, or nothing) are the
//! request's. The template is split once, at configuration time.

use http::{header, HeaderValue};
use pingora_http::RequestHeader;

use crate::config::{strip_port, RedirectConfig, Scheme};
use crate::http::answer::{Stop, StopBody};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Scheme,
    Host,
    Path,
    Query,
}

#[derive(Debug)]
enum Part {
    Text(String),
    Field(Field),
}

#[derive(Debug)]
pub struct Redirect {
    parts: Vec<Part>,
    status: u16,
}

impl Redirect {
    pub fn new(c: &RedirectConfig) -> Redirect {
        let mut parts = Vec::new();
        let mut rest = c.to.as_str();
        while let Some(open) = rest.find('{') {
            let after = &rest[open + 1..];
            let field = after.find('}').and_then(|close| {
                let f = match &after[..close] {
                    "scheme" => Field::Scheme,
                    "host" => Field::Host,
                    "path" => Field::Path,
                    "query" => Field::Query,
                    _ => return None,
                };
                Some((f, close))
            });
            match field {
                Some((f, close)) => {
                    if open > 0 {
                        parts.push(Part::Text(rest[..open].to_string()));
                    }
                    parts.push(Part::Field(f));
                    rest = &after[close + 1..];
                }
                // Validation allows no other brace: kept as text all the same.
                None => {
                    parts.push(Part::Text(rest[..=open].to_string()));
                    rest = after;
                }
            }
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Redirect {
            parts,
            status: c.status,
        }
    }

    /// The `Location` for `req` (`https`: it came over TLS).
    pub fn location(&self, req: &RequestHeader, https: bool) -> String {
        let mut out = String::with_capacity(64);
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field(Field::Scheme) => out.push_str(Scheme::of(https).as_str()),
                Part::Field(Field::Host) => {
                    out.push_str(crate::keys::request_host(req).map_or("", strip_port))
                }
                Part::Field(Field::Path) => out.push_str(req.uri.path()),
                Part::Field(Field::Query) => {
                    if let Some(q) = req.uri.query().filter(|q| !q.is_empty()) {
                        out.push('?');
                        out.push_str(q);
                    }
                }
            }
        }
        out
    }

    /// The gateway's answer to `req`.
    pub fn answer(&self, req: &RequestHeader, https: bool) -> Stop {
        let location = self.location(req, https);
        let headers = match HeaderValue::from_str(&location) {
            Ok(v) => vec![(header::LOCATION, v)],
            Err(_) => Vec::new(),
        };
        Stop {
            status: self.status,
            headers,
            body: StopBody::Empty,
            denied: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_expand_the_request_fields() {
        let r = Redirect::new(&RedirectConfig {
            to: "https://{host}{path}{query}".into(),
            status: 308,
        });
        let mut req = RequestHeader::build("GET", b"/a/b?x=1", None).unwrap();
        req.insert_header("host", "Example.com:8080").unwrap();
        assert_eq!(r.location(&req, false), "https://Example.com/a/b?x=1");
        let plain = Redirect::new(&RedirectConfig {
            to: "{scheme}://new.example{path}".into(),
            status: 301,
        });
        assert_eq!(plain.location(&req, true), "https://new.example/a/b");
        let fixed = Redirect::new(&RedirectConfig {
            to: "/elsewhere".into(),
            status: 302,
        });
        assert_eq!(fixed.location(&req, false), "/elsewhere");
        assert_eq!(fixed.answer(&req, false).status, 302);
    }
}
