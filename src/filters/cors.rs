//! `cors:`: a preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is
//! answered by the gateway (204 with the `Access-Control-Allow-*` headers when the origin,
//! method and headers are allowed; 403 when not), never reaching the upstream; the answer
//! to an actual request from an allowed origin gets `Access-Control-Allow-Origin` (and
//! `-Credentials`, `-Expose-Headers`). Every answer on the route says `Vary: Origin`.

use async_trait::async_trait;
use http::header::{self, HeaderName, HeaderValue};
use http::Method;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use super::RequestFilter;
use crate::config::CorsConfig;
use crate::http::answer::{Stop, StopBody};
use crate::http::passage::Passage;

pub struct Cors {
    /// Lower case; empty: any origin.
    origins: Vec<String>,
    methods: Vec<Method>,
    /// Lower case.
    headers: Vec<HeaderName>,
    credentials: bool,
    allow_methods: HeaderValue,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
}

/// Headers a browser may send cross-origin without asking (the Fetch standard's
/// CORS-safelisted request headers).
const SAFELISTED: [&str; 4] = [
    "accept",
    "accept-language",
    "content-language",
    "content-type",
];

fn joined<T: AsRef<str>>(items: &[T]) -> Option<HeaderValue> {
    let text = items
        .iter()
        .map(|i| i.as_ref())
        .collect::<Vec<_>>()
        .join(", ");
    (!text.is_empty())
        .then(|| HeaderValue::from_str(&text).ok())
        .flatten()
}

impl Cors {
    pub fn new(c: &CorsConfig) -> Cors {
        let methods: Vec<&str> = c.methods.iter().map(Method::as_str).collect();
        Cors {
            origins: c.origins.clone(),
            methods: c.methods.clone(),
            headers: c.headers.clone(),
            credentials: c.credentials,
            allow_methods: joined(&methods).unwrap_or(HeaderValue::from_static("GET")),
            allow_headers: joined(&c.headers),
            expose_headers: joined(&c.expose_headers),
            max_age: (!c.max_age.is_zero()).then(|| HeaderValue::from(c.max_age.as_secs())),
        }
    }

    fn allows_origin(&self, origin: &HeaderValue) -> bool {
        self.origins.is_empty()
            || origin.to_str().is_ok_and(|o| {
                self.origins
                    .iter()
                    .any(|allowed| allowed.eq_ignore_ascii_case(o))
            })
    }

    /// The value of `Access-Control-Allow-Origin` for an allowed `origin`.
    fn allow_origin(&self, origin: &HeaderValue) -> HeaderValue {
        if self.origins.is_empty() {
            HeaderValue::from_static("*")
        } else {
            origin.clone()
        }
    }

    /// Whether a preflight's requested method and headers are all allowed.
    fn allows_request(&self, req: &pingora_http::RequestHeader) -> bool {
        let method = req
            .headers
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|m| Method::from_bytes(m.as_bytes()).ok());
        let method_ok = method.is_some_and(|m| self.methods.contains(&m));
        let headers_ok = req
            .headers
            .get_all(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("\u{0}").split(','))
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .all(|h| {
                SAFELISTED.contains(&h.as_str()) || self.headers.iter().any(|a| a.as_str() == h)
            });
        method_ok && headers_ok
    }

    fn preflight(&self, origin: &HeaderValue, req: &pingora_http::RequestHeader) -> Stop {
        let vary = (header::VARY, HeaderValue::from_static("Origin"));
        if !(self.allows_origin(origin) && self.allows_request(req)) {
            return Stop {
                status: 403,
                headers: vec![vary],
                body: StopBody::Error("CORS preflight refused"),
                denied: None,
            };
        }
        let mut headers = vec![
            vary,
            (
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                self.allow_origin(origin),
            ),
            (
                header::ACCESS_CONTROL_ALLOW_METHODS,
                self.allow_methods.clone(),
            ),
        ];
        if let Some(h) = &self.allow_headers {
            headers.push((header::ACCESS_CONTROL_ALLOW_HEADERS, h.clone()));
        }
        if self.credentials {
            headers.push((
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            ));
        }
        if let Some(age) = &self.max_age {
            headers.push((header::ACCESS_CONTROL_MAX_AGE, age.clone()));
        }
        Stop {
            status: 204,
            headers,
            body: StopBody::Empty,
            denied: None,
        }
    }
}

#[async_trait]
impl RequestFilter for Cors {
    async fn request(&self, session: &mut Session, pass: &mut Passage) -> Result<(), Stop> {
        let req = session.req_header();
        let Some(origin) = req.headers.get(header::ORIGIN) else {
            return Ok(());
        };
        let is_preflight = req.method == Method::OPTIONS
            && req
                .headers
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        if is_preflight {
            return Err(self.preflight(origin, req));
        }
        if self.allows_origin(origin) {
            pass.origin = Some(origin.clone());
        }
        Ok(())
    }

    fn response(&self, pass: &Passage, resp: &mut ResponseHeader) {
        crate::http::headers::add_vary(resp, "Origin");
        let Some(origin) = &pass.origin else {
            return;
        };
        if resp
            .headers
            .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
        {
            // A preflight's own answer, already complete.
            return;
        }
        let _ = resp.insert_header(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            self.allow_origin(origin),
        );
        if self.credentials {
            let _ = resp.insert_header(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(expose) = &self.expose_headers {
            let _ = resp.insert_header(header::ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
        }
    }
}
