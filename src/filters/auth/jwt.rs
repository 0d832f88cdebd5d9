//! `auth.jwt`: a bearer token (`Authorization: Bearer`, or the configured header) checked
//! against a JWKS file, a JWKS URL or an HMAC secret. The token's `alg` must be one of
//! the route's `algorithms`, and HMAC algorithms exist only with a `secret_file` (and
//! public-key ones only with key sets), so neither `alg: none` nor a public key used as an
//! HMAC secret can pass; the key's family must match the algorithm too. `exp` (required)
//! and `nbf` are held to `leeway`, `iss` and `aud` to the route's. The claims named in
//! `claims_to_headers` are set as request headers (a client-sent header of that name is
//! always removed); `sub` is the identity.
//!
//! A JWKS URL is fetched when first needed, again in the background once older than
//! `refresh`, and kept when a fetch fails; a token whose `kid` is unknown makes the
//! gateway fetch it again, at most once every [`FORCED_EVERY`]. A token whose signature
//! was checked is remembered by its SHA-256 until it expires (at most five minutes), so a
//! client that sends the same token on every request costs one signature check.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use http::{HeaderName, HeaderValue, Method};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::Mutex;
use pingora_proxy::Session;
use serde_json::Value;

use super::{authorization, digest, set_request_header, unauthorized, Remembered, REMEMBERED};
use crate::config::{JwtConfig, JwtKeys};
use crate::filters::{Build, RequestFilter};
use crate::http::answer::{Reason, Stop};
use crate::http::passage::Passage;
use crate::outbound::service::Service;

/// How long a checked token is remembered at most.
const REMEMBER: Duration = Duration::from_secs(300);
/// The least time between two fetches of a JWKS URL forced by an unknown `kid`.
pub const FORCED_EVERY: Duration = Duration::from_secs(10);
/// The bound on one JWKS fetch, and on its size.
const FETCH_LIMIT: Duration = Duration::from_secs(5);
const FETCH_MAX_BODY: u64 = 1024 * 1024;

/// A key tokens are checked with.
struct Key {
    kid: Option<String>,
    key: DecodingKey,
}

fn keys_of(set: &JwkSet) -> Vec<Key> {
    set.keys
        .iter()
        .filter_map(|jwk| {
            Some(Key {
                kid: jwk.common.key_id.clone(),
                key: DecodingKey::from_jwk(jwk).ok()?,
            })
        })
        .collect()
}

/// What a checked token let through: kept per token.
pub struct Checked {
    /// Its `sub`.
    pub identity: Option<Arc<str>>,
    /// The request headers its claims set (`None`: removed).
    pub headers: Vec<(HeaderName, Option<HeaderValue>)>,
    exp: Option<u64>,
    nbf: Option<u64>,
}

enum Keys {
    Fixed(Vec<Key>),
    Remote(Arc<Remote>),
}

pub struct Jwt {
    keys: Keys,
    algorithms: Vec<Algorithm>,
    issuer: Option<String>,
    audience: Vec<String>,
    leeway: Duration,
    claims_to_headers: Vec<(String, HeaderName)>,
    header: Option<HeaderName>,
    checked: Remembered<Arc<Checked>>,
}

/// Why a token was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Expired, or not valid yet.
    Expired,
    /// Anything else: malformed, wrong signature, algorithm, issuer, audience, key.
    Invalid(String),
}

impl Jwt {
    pub fn new(c: &JwtConfig, with: &Build) -> Jwt {
        let keys = match &c.keys {
            JwtKeys::Url { service, refresh } => Keys::Remote(Arc::new(Remote {
                service: Service::new(service, with.metrics, with.connector),
                refresh: *refresh,
                keys: ArcSwapOption::empty(),
                fetched: Mutex::new(None),
                attempted: Mutex::new(None),
                fetching: tokio::sync::Mutex::new(()),
            })),
            _ => Keys::Fixed(Vec::new()),
        };
        Jwt::with_keys(c, keys)
    }

    /// A checker for keys given in the configuration (a JWKS file, a secret); `None` for a
    /// JWKS URL, which needs the gateway to fetch it. (The fuzz target checks tokens
    /// with it.)
    pub fn fixed(c: &JwtConfig) -> Option<Jwt> {
        match &c.keys {
            JwtKeys::Url { .. } => None,
            _ => Some(Jwt::with_keys(c, Keys::Fixed(Vec::new()))),
        }
    }

    fn with_keys(c: &JwtConfig, remote: Keys) -> Jwt {
        let keys = match &c.keys {
            JwtKeys::Set(set) => Keys::Fixed(keys_of(set)),
            JwtKeys::Secret(secret) => Keys::Fixed(vec![Key {
                kid: None,
                key: DecodingKey::from_secret(secret),
            }]),
            JwtKeys::Url { .. } => remote,
        };
        Jwt {
            keys,
            algorithms: c.algorithms.clone(),
            issuer: c.issuer.clone(),
            audience: c.audience.clone(),
            leeway: c.leeway,
            claims_to_headers: c.claims_to_headers.clone(),
            header: c.header.clone(),
            checked: Remembered::new(REMEMBERED, REMEMBER),
        }
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.algorithms = vec![alg];
        v.leeway = self.leeway.as_secs();
        v.validate_nbf = true;
        v.validate_exp = true;
        if self.audience.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&self.audience);
            v.required_spec_claims.insert("aud".into());
        }
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            v.required_spec_claims.insert("iss".into());
        }
        v
    }

    /// Checks `token`'s signature and claims against `keys`: the key its `kid` names, or
    /// (without a `kid`) each key in turn. `Ok(None)`: no key has its `kid`.
    fn check_with(
        &self,
        token: &str,
        keys: &[Key],
    ) -> Result<Option<serde_json::Map<String, Value>>, Refused> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| Refused::Invalid(e.to_string()))?;
        if !self.algorithms.contains(&header.alg) {
            return Err(Refused::Invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let validation = self.validation(header.alg);
        let candidates: Vec<&Key> = match &header.kid {
            Some(kid) => keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid.as_str()) || k.kid.is_none())
                .collect(),
            None => keys.iter().collect(),
        };
        if candidates.is_empty() {
            return Ok(None);
        }
        let mut last = Refused::Invalid("no key".into());
        for k in candidates {
            match jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &k.key, &validation)
            {
                Ok(data) => return Ok(Some(data.claims)),
                Err(e) => {
                    last = match e.kind() {
                        ErrorKind::ExpiredSignature | ErrorKind::ImmatureSignature => {
                            // The signature was good: no other key can do better.
                            return Err(Refused::Expired);
                        }
                        _ => Refused::Invalid(e.to_string()),
                    }
                }
            }
        }
        Err(last)
    }

    /// What `token` lets through, from memory or checked now.
    pub async fn check(&self, token: &str) -> Result<Arc<Checked>, Refused> {
        let key = digest(&[b"jwt", token.as_bytes()]);
        let now = unix_now();
        let leeway = self.leeway.as_secs();
        if let Some(c) = self.checked.get(&key) {
            let expired = c.exp.is_some_and(|exp| now > exp.saturating_add(leeway));
            let early = c.nbf.is_some_and(|nbf| now.saturating_add(leeway) < nbf);
            return if expired || early {
                Err(Refused::Expired)
            } else {
                Ok(c)
            };
        }
        let claims = match &self.keys {
            Keys::Fixed(keys) => self.check_with(token, keys)?,
            Keys::Remote(remote) => {
                let keys = remote.current().await;
                match self.check_with(token, keys.as_deref().map_or(&[], |k| k.as_slice()))? {
                    Some(claims) => Some(claims),
                    // An unknown key id: perhaps a key the JWKS has since gained.
                    None => match remote.forced().await {
                        Some(keys) => self.check_with(token, &keys)?,
                        None => None,
                    },
                }
            }
        };
        let claims = claims.ok_or_else(|| Refused::Invalid("unknown key id".into()))?;
        let number = |name: &str| claims.get(name).and_then(Value::as_u64);
        let (exp, nbf) = (number("exp"), number("nbf"));
        let checked = Arc::new(Checked {
            identity: claims.get("sub").and_then(claim_text).map(Arc::from),
            headers: self
                .claims_to_headers
                .iter()
                .map(|(claim, name)| {
                    let value = claims
                        .get(claim)
                        .and_then(claim_text)
                        .and_then(|t| HeaderValue::from_str(&t).ok());
                    (name.clone(), value)
                })
                .collect(),
            exp,
            nbf,
        });
        let lifetime = exp.map_or(REMEMBER, |exp| {
            Duration::from_secs(exp.saturating_add(leeway).saturating_sub(now))
        });
        self.checked.put_for(key, Arc::clone(&checked), lifetime);
        Ok(checked)
    }

    fn token<'a>(&self, req: &'a pingora_http::RequestHeader) -> Option<&'a str> {
        match &self.header {
            None => authorization(req, "bearer"),
            Some(name) => req.headers.get(name)?.to_str().ok().map(str::trim),
        }
    }
}

/// A claim as header text: a string as it is, a list of strings joined by spaces (OAuth
/// scopes), anything else as JSON.
fn claim_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        Value::Array(items) if items.iter().all(Value::is_string) => Some(
            items
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" "),
        ),
        other => Some(other.to_string()),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[async_trait]
impl RequestFilter for Jwt {
    async fn request(&self, session: &mut Session, pass: &mut Passage) -> Result<(), Stop> {
        let challenge = |error: Option<&str>| {
            let text = match error {
                None => "Bearer realm=\"fanout\"".to_string(),
                Some(e) => format!("Bearer realm=\"fanout\", error=\"{e}\""),
            };
            HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("Bearer"))
        };
        let Some(token) = self.token(session.req_header()).map(str::to_string) else {
            return Err(unauthorized(Reason::Credential, challenge(None)));
        };
        match self.check(&token).await {
            Ok(checked) => {
                let req = session.req_header_mut();
                for (name, value) in &checked.headers {
                    set_request_header(req, name, value.clone());
                }
                pass.client.identity = checked.identity.clone();
                Ok(())
            }
            Err(Refused::Expired) => Err(unauthorized(
                Reason::Expired,
                challenge(Some("invalid_token")),
            )),
            Err(Refused::Invalid(why)) => {
                log::debug!("token refused: {why}");
                Err(unauthorized(
                    Reason::Credential,
                    challenge(Some("invalid_token")),
                ))
            }
        }
    }
}

/// A JWKS URL's keys, fetched by the gateway.
struct Remote {
    service: Service,
    refresh: Duration,
    keys: ArcSwapOption<Vec<Key>>,
    /// When the keys in hand were fetched.
    fetched: Mutex<Option<Instant>>,
    /// When the last fetch started (successful or not).
    attempted: Mutex<Option<Instant>>,
    /// One fetch at a time.
    fetching: tokio::sync::Mutex<()>,
}

impl Remote {
    /// The keys in hand: fetched now if there are none yet, fetched again in the
    /// background once older than `refresh`.
    async fn current(self: &Arc<Self>) -> Option<Arc<Vec<Key>>> {
        let Some(keys) = self.keys.load_full() else {
            let seen = *self.fetched.lock();
            self.fetch(seen).await;
            return self.keys.load_full();
        };
        let stale = self
            .fetched
            .lock()
            .is_none_or(|at| at.elapsed() >= self.refresh);
        let idle = self
            .attempted
            .lock()
            .is_none_or(|at| at.elapsed() >= FORCED_EVERY.min(self.refresh));
        if stale && idle {
            let me = Arc::clone(self);
            let seen = *self.fetched.lock();
            tokio::spawn(async move { me.fetch(seen).await });
        }
        Some(keys)
    }

    /// Fetches the keys again for an unknown `kid`, unless that was done within
    /// [`FORCED_EVERY`]; the new keys, if a fetch ran and succeeded.
    async fn forced(self: &Arc<Self>) -> Option<Arc<Vec<Key>>> {
        let recent = self
            .attempted
            .lock()
            .is_some_and(|at| at.elapsed() < FORCED_EVERY.min(self.refresh));
        if recent {
            return None;
        }
        let before = *self.fetched.lock();
        self.fetch(before).await;
        let after = *self.fetched.lock();
        (after != before).then(|| self.keys.load_full()).flatten()
    }

    /// One fetch. A caller that waited for another's fetch takes its result instead
    /// (the keys changed since `seen`), and no fetch starts within a second of a failed
    /// one: a JWKS URL that is down costs one attempt a second, not one per request.
    async fn fetch(&self, seen: Option<Instant>) {
        let _one = self.fetching.lock().await;
        if *self.fetched.lock() != seen {
            return;
        }
        let just_failed = self
            .attempted
            .lock()
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1));
        if just_failed {
            return;
        }
        *self.attempted.lock() = Some(Instant::now());
        let accept = [(
            http::header::ACCEPT,
            HeaderValue::from_static("application/json"),
        )];
        let result = self
            .service
            .ask(Method::GET, &accept, FETCH_LIMIT, FETCH_MAX_BODY)
            .await;
        let set = match result {
            Ok((head, body)) if head.status.is_success() => std::str::from_utf8(&body)
                .map_err(|_| "not UTF-8".to_string())
                .and_then(crate::config::jwks),
            Ok((head, _)) => Err(format!("answered {}", head.status.as_u16())),
            Err(e) => Err(e.to_string()),
        };
        match set {
            Ok(set) => {
                self.keys.store(Some(Arc::new(keys_of(&set))));
                *self.fetched.lock() = Some(Instant::now());
                log::info!("JWKS {}: {} keys", self.service.url, set.keys.len());
            }
            Err(e) => log::warn!("JWKS {}: {e} (keeping the keys in hand)", self.service.url),
        }
    }
}
