//! `auth.forward` (nginx's `auth_request`, Traefik's ForwardAuth): the gateway asks an
//! auth service with the request's credential headers (`request_headers`) and
//! `X-Forwarded-Method`/`-Proto`/`-Host`/`-Uri`/`-For`. A 2xx lets the request through,
//! with the service's `response_headers` copied onto it (a client-sent header of the same
//! name is removed first; the first one present is the identity); a 401 or 403 is relayed
//! to the client with its body; anything else, a timeout or an error is 503: an auth
//! service that cannot decide never means "allow". Decisions (pass or refuse) are reused
//! per credential for `cache`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method};
use pingora_proxy::Session;

use super::{digest, set_request_header, Remembered, REMEMBERED};
use crate::config::ForwardAuthConfig;
use crate::filters::{Build, RequestFilter};
use crate::http::answer::{Reason, Stop, StopBody};
use crate::http::passage::Passage;
use crate::outbound::service::Service;

/// The largest auth answer body relayed to a client.
const MAX_BODY: u64 = 64 * 1024;

/// The answer's headers relayed with a refusal.
const RELAYED: [HeaderName; 3] = [
    header::WWW_AUTHENTICATE,
    header::CONTENT_TYPE,
    header::SET_COOKIE,
];

#[derive(Clone)]
enum Decision {
    /// Through, with these headers set on the request (`None`: removed).
    Allow(Arc<[(HeaderName, Option<HeaderValue>)]>),
    Refuse {
        status: u16,
        headers: Arc<[(HeaderName, HeaderValue)]>,
        body: Bytes,
        content_type: Option<HeaderValue>,
    },
}

pub struct Forward {
    service: Service,
    request_headers: Vec<HeaderName>,
    response_headers: Vec<HeaderName>,
    timeout: Duration,
    decisions: Remembered<Decision>,
}

impl Forward {
    pub fn new(c: &ForwardAuthConfig, with: &Build) -> Forward {
        Forward {
            service: Service::new(&c.service, with.metrics, with.connector),
            request_headers: c.request_headers.clone(),
            response_headers: c.response_headers.clone(),
            timeout: c.timeout,
            decisions: Remembered::new(REMEMBERED, c.cache),
        }
    }

    async fn decide(&self, session: &Session, pass: &Passage) -> Result<Decision, Stop> {
        let req = session.req_header();
        let mut headers: Vec<(HeaderName, HeaderValue)> = Vec::new();
        let mut parts: Vec<&[u8]> = vec![b"forward"];
        for name in &self.request_headers {
            for v in req.headers.get_all(name) {
                headers.push((name.clone(), v.clone()));
                parts.push(name.as_str().as_bytes());
                parts.push(v.as_bytes());
            }
        }
        let key = digest(&parts);
        if let Some(d) = self.decisions.get(&key) {
            return Ok(d);
        }
        let forwarded = [
            ("x-forwarded-method", Some(req.method.as_str().to_string())),
            (
                "x-forwarded-proto",
                Some(if pass.client.https { "https" } else { "http" }.to_string()),
            ),
            (
                "x-forwarded-host",
                crate::keys::request_host(req).map(String::from),
            ),
            (
                "x-forwarded-uri",
                req.uri.path_and_query().map(|p| p.as_str().to_string()),
            ),
            ("x-forwarded-for", pass.client.ip.map(|ip| ip.to_string())),
        ];
        for (name, value) in forwarded {
            if let Some(v) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
                headers.push((HeaderName::from_static(name), v));
            }
        }
        let unavailable = |why: &dyn std::fmt::Display| {
            log::warn!("forward auth {}: {why}", self.service.url);
            Stop::denied(503, Reason::Forward, "authorization service unavailable")
                .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
        };
        let (head, body) = self
            .service
            .ask(Method::GET, &headers, self.timeout, MAX_BODY)
            .await
            .map_err(|e| unavailable(&e))?;
        let decision = match head.status.as_u16() {
            200..=299 => Decision::Allow(
                self.response_headers
                    .iter()
                    .map(|n| (n.clone(), head.headers.get(n).cloned()))
                    .collect(),
            ),
            status @ (401 | 403) => Decision::Refuse {
                status,
                headers: RELAYED
                    .iter()
                    .filter(|n| **n != header::CONTENT_TYPE)
                    .flat_map(|n| {
                        head.headers
                            .get_all(n)
                            .iter()
                            .map(|v| (n.clone(), v.clone()))
                    })
                    .collect(),
                content_type: head.headers.get(header::CONTENT_TYPE).cloned(),
                body,
            },
            other => return Err(unavailable(&format!("answered {other}"))),
        };
        self.decisions.put(key, decision.clone());
        Ok(decision)
    }
}

#[async_trait]
impl RequestFilter for Forward {
    async fn request(&self, session: &mut Session, pass: &mut Passage) -> Result<(), Stop> {
        match self.decide(session, pass).await? {
            Decision::Allow(set) => {
                let req = session.req_header_mut();
                for (name, value) in set.iter() {
                    set_request_header(req, name, value.clone());
                }
                pass.client.identity = set
                    .iter()
                    .find_map(|(_, v)| v.as_ref()?.to_str().ok())
                    .map(Arc::from);
                Ok(())
            }
            Decision::Refuse {
                status,
                headers,
                body,
                content_type,
            } => Err(Stop {
                status,
                headers: headers.to_vec(),
                body: StopBody::Relayed(body, content_type),
                denied: Some(Reason::Forward),
            }),
        }
    }
}
