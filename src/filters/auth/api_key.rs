//! `auth.api_key`: a key from a header (default `X-API-Key`) or a query parameter, looked
//! up among a keys file's keys by its SHA-256, then compared in constant time. The
//! identity is the key's name from the file, else a short digest of the key. A key given
//! in the query is removed from it before the request goes on.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use http::HeaderValue;
use pingora_proxy::Session;
use subtle::ConstantTimeEq;

use super::{anonymous, digest, unauthorized, Digest};
use crate::config::{ApiKeyConfig, CredentialFrom};
use crate::filters::RequestFilter;
use crate::http::answer::{Reason, Stop};
use crate::http::passage::Passage;

pub struct ApiKeys {
    from: CredentialFrom,
    /// By the key's digest: the key and the identity it stands for.
    keys: HashMap<Digest, (Vec<u8>, Arc<str>)>,
}

impl ApiKeys {
    pub fn new(c: &ApiKeyConfig) -> ApiKeys {
        let keys = c
            .keys
            .iter()
            .map(|k| {
                let d = digest(&[k.key.as_bytes()]);
                let identity = k.name.clone().unwrap_or_else(|| anonymous("key", &d));
                (d, (k.key.as_bytes().to_vec(), Arc::from(identity)))
            })
            .collect();
        ApiKeys {
            from: c.from.clone(),
            keys,
        }
    }

    /// The identity `presented` stands for, if it is one of the keys.
    pub fn identify(&self, presented: &[u8]) -> Option<Arc<str>> {
        let (key, identity) = self.keys.get(&digest(&[presented]))?;
        bool::from(key.as_slice().ct_eq(presented)).then(|| Arc::clone(identity))
    }
}

/// The value of query parameter `name` in `query`, and the query without it.
fn take_param(query: &str, name: &str) -> Option<(String, String)> {
    let mut found = None;
    let mut rest: Vec<&str> = Vec::new();
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if found.is_none() && k == name {
            found = Some(percent_decode(v));
        } else if !pair.is_empty() {
            rest.push(pair);
        }
    }
    found.map(|v| (v, rest.join("&")))
}

fn percent_decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[async_trait]
impl RequestFilter for ApiKeys {
    async fn request(&self, session: &mut Session, pass: &mut Passage) -> Result<(), Stop> {
        let challenge = || unauthorized(Reason::Credential, HeaderValue::from_static("ApiKey"));
        let identity = match &self.from {
            CredentialFrom::Header(name) => {
                let presented = session.req_header().headers.get(name);
                presented.and_then(|v| self.identify(v.as_bytes()))
            }
            CredentialFrom::Query(param) => {
                let req = session.req_header();
                let Some((key, rest)) = req.uri.query().and_then(|q| take_param(q, param)) else {
                    return Err(challenge());
                };
                let identity = self.identify(key.as_bytes());
                if identity.is_some() {
                    // The key does not travel on: not upstream, not into any copy.
                    let target = if rest.is_empty() {
                        req.uri.path().to_string()
                    } else {
                        format!("{}?{rest}", req.uri.path())
                    };
                    let mut parts = req.uri.clone().into_parts();
                    parts.path_and_query = target.parse().ok();
                    if let Ok(uri) = http::Uri::from_parts(parts) {
                        session.req_header_mut().set_uri(uri);
                    }
                }
                identity
            }
        };
        match identity {
            Some(id) => {
                pass.client.identity = Some(id);
                Ok(())
            }
            None => Err(challenge()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApiKey;

    #[test]
    fn keys_are_found_by_value_and_named() {
        let k = ApiKeys::new(&ApiKeyConfig {
            from: CredentialFrom::Query("key".into()),
            keys: vec![
                ApiKey {
                    key: "0123456789abcdef-alice".into(),
                    name: Some("alice".into()),
                },
                ApiKey {
                    key: "0123456789abcdef-nameless".into(),
                    name: None,
                },
            ],
        });
        assert_eq!(
            k.identify(b"0123456789abcdef-alice").as_deref(),
            Some("alice")
        );
        assert!(k
            .identify(b"0123456789abcdef-nameless")
            .is_some_and(|id| id.starts_with("key:") && !id.contains("nameless")));
        assert_eq!(k.identify(b"0123456789abcdef-alicf"), None);
        assert_eq!(k.identify(b""), None);
    }

    #[test]
    fn the_key_is_taken_out_of_the_query() {
        assert_eq!(
            take_param("a=1&key=s%3Dx&b=2", "key"),
            Some(("s=x".to_string(), "a=1&b=2".to_string()))
        );
        assert_eq!(take_param("a=1", "key"), None);
        assert_eq!(
            take_param("key=v", "key"),
            Some(("v".into(), String::new()))
        );
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%41%"), "A%");
    }
}
