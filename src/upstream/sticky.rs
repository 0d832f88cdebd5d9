//! Session affinity (`sticky:` on an upstream): the first answer carries a cookie naming
//! the backend that gave it, and later requests carrying the cookie go back to that backend
//! while it is available (not drained, disabled, unhealthy or with its circuit open); when
//! it is not, the request is balanced as usual and the cookie renewed for the backend that
//! answers. This works with every `balance`: stickiness is tried first, balancing after.
//!
//! The cookie is opaque and signed: base64url of the backend's id (a stable hash of the
//! upstream's name and the backend's label, never its address), an expiry time, and a
//! truncated HMAC-SHA256 of both under the process's affinity key. A forged, altered or
//! expired value is ignored, never an error. The key is random and kept across reloads;
//! with `state: { store: disk }` it is kept in the state directory ([`keep_key_in`]), so
//! cookies stay valid across restarts and upgrades (and on every instance that shares the
//! directory's key file). Without it, after a restart a cookie is not recognised, the
//! request is balanced and the cookie renewed.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::HeaderValue;
use ring::hmac;
use subtle::ConstantTimeEq;

use crate::config::StickyConfig;
use crate::http::headers::cookie;
use crate::keys;

/// Bytes of the HMAC kept in a cookie: 96 bits, as many forgeries as anyone can try.
const TAG: usize = 12;
/// id (8) + expiry (4) + tag.
const LEN: usize = 8 + 4 + TAG;

static KEY: OnceLock<hmac::Key> = OnceLock::new();

/// The key file in the state directory.
const KEY_FILE: &str = "affinity.key";

/// Signs cookies with the key kept in `dir` (made on first use: 32 random bytes, readable
/// by the owner only). Called once at start, before any request.
pub(crate) fn keep_key_in(dir: &Path) -> Result<(), String> {
    let fail = |what: &str, e: std::io::Error| format!("state.dir {}: {what}: {e}", dir.display());
    fs::create_dir_all(dir).map_err(|e| fail("cannot create it", e))?;
    let path = dir.join(KEY_FILE);
    let secret = match fs::read(&path) {
        Ok(bytes) if bytes.len() == 32 => bytes,
        Ok(bytes) => {
            return Err(format!(
                "{}: {} bytes, not a key of 32 (remove it to make a new one)",
                path.display(),
                bytes.len()
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = random_secret();
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| fail("cannot write the affinity key", e))?;
            file.write_all(&secret)
                .and_then(|()| file.sync_all())
                .map_err(|e| fail("cannot write the affinity key", e))?;
            secret.to_vec()
        }
        Err(e) => return Err(fail("cannot read the affinity key", e)),
    };
    // Set once per process: a graceful upgrade's new process reads the same file.
    let _ = KEY.set(hmac::Key::new(hmac::HMAC_SHA256, &secret));
    Ok(())
}

/// 32 bytes from the operating system's generator.
fn random_secret() -> [u8; 32] {
    let mut secret = [0u8; 32];
    let rng = ring::rand::SystemRandom::new();
    if ring::rand::SecureRandom::fill(&rng, &mut secret).is_err() {
        // No OS randomness (never seen on Linux): the per-thread generator, seeded from
        // the process's random hasher state.
        for chunk in secret.chunks_mut(8) {
            chunk.copy_from_slice(&keys::random_u64().to_le_bytes());
        }
    }
    secret
}

fn key() -> &'static hmac::Key {
    KEY.get_or_init(|| hmac::Key::new(hmac::HMAC_SHA256, &random_secret()))
}

/// A backend's id in cookies: the same in every process for the same upstream and label.
pub(crate) fn backend_id(upstream: &str, label: &str) -> u64 {
    let mut text = Vec::with_capacity(upstream.len() + 1 + label.len());
    text.extend_from_slice(upstream.as_bytes());
    text.push(0);
    text.extend_from_slice(label.as_bytes());
    keys::stable_hash(&text)
}

/// What a request's affinity cookie asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Wanted {
    /// The backend it names.
    pub(crate) backend: u64,
    /// Past half its lifetime: the answer renews it.
    pub(crate) renew: bool,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn tag(id: u64, expires: u32) -> hmac::Tag {
    let mut signed = [0u8; 12];
    signed[..8].copy_from_slice(&id.to_le_bytes());
    signed[8..].copy_from_slice(&expires.to_le_bytes());
    hmac::sign(key(), &signed)
}

/// The backend a request's cookie names, if the cookie is genuine and not expired.
pub(crate) fn wanted(config: &StickyConfig, headers: &http::HeaderMap) -> Option<Wanted> {
    let value = cookie(headers, &config.cookie)?;
    let mut raw = [0u8; LEN + 3];
    let n = URL_SAFE_NO_PAD.decode_slice(value, &mut raw).ok()?;
    if n != LEN {
        return None;
    }
    let id = u64::from_le_bytes(raw[..8].try_into().ok()?);
    let expires = u32::from_le_bytes(raw[8..12].try_into().ok()?);
    let genuine = tag(id, expires).as_ref()[..TAG].ct_eq(&raw[12..LEN]);
    let now = now_secs();
    if !bool::from(genuine) || u64::from(expires) <= now {
        return None;
    }
    let left = u64::from(expires) - now;
    Some(Wanted {
        backend: id,
        renew: left < config.ttl.as_secs() / 2,
    })
}

/// The `Set-Cookie` value naming backend `id`; `https`: the client came over TLS.
pub(crate) fn set_cookie(config: &StickyConfig, id: u64, https: bool) -> Option<HeaderValue> {
    let ttl = config.ttl.as_secs().max(1);
    let expires = u32::try_from(now_secs().saturating_add(ttl)).unwrap_or(u32::MAX);
    let mut raw = [0u8; LEN];
    raw[..8].copy_from_slice(&id.to_le_bytes());
    raw[8..12].copy_from_slice(&expires.to_le_bytes());
    raw[12..].copy_from_slice(&tag(id, expires).as_ref()[..TAG]);
    let mut text = format!(
        "{}={}; Path=/; Max-Age={ttl}; SameSite=Lax",
        config.cookie,
        URL_SAFE_NO_PAD.encode(raw)
    );
    if config.http_only {
        text.push_str("; HttpOnly");
    }
    if config.secure.unwrap_or(https) {
        text.push_str("; Secure");
    }
    HeaderValue::from_str(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn config() -> StickyConfig {
        StickyConfig {
            cookie: "aff".into(),
            ttl: Duration::from_secs(3600),
            secure: None,
            http_only: true,
        }
    }

    fn request_with(set_cookie: &HeaderValue) -> http::HeaderMap {
        let pair = set_cookie
            .to_str()
            .expect("text")
            .split(';')
            .next()
            .expect("pair");
        let mut headers = http::HeaderMap::new();
        let value = format!("other=1; {pair}");
        headers.insert(http::header::COOKIE, value.parse().expect("value"));
        headers
    }

    #[test]
    fn a_cookie_names_its_backend_and_a_forged_one_is_ignored() {
        let c = config();
        let set = set_cookie(&c, 42, false).expect("cookie");
        let text = set.to_str().expect("text");
        assert!(
            text.contains("HttpOnly") && !text.contains("Secure"),
            "{text}"
        );
        assert!(set_cookie(&c, 42, true)
            .expect("cookie")
            .to_str()
            .expect("text")
            .contains("Secure"));
        let wanted = wanted(&c, &request_with(&set)).expect("genuine");
        assert_eq!(
            wanted,
            Wanted {
                backend: 42,
                renew: false
            }
        );

        // Another backend's id with this cookie's tag: refused.
        let value = text
            .split(';')
            .next()
            .expect("pair")
            .trim_start_matches("aff=");
        let mut raw = URL_SAFE_NO_PAD.decode(value).expect("base64");
        raw[0] ^= 1;
        let forged = format!("aff={}", URL_SAFE_NO_PAD.encode(&raw));
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::COOKIE, forged.parse().expect("value"));
        assert_eq!(super::wanted(&c, &headers), None);
        for junk in ["aff=", "aff=!!!", "aff=AAAA", "aff=10.0.0.1:8080"] {
            headers.insert(http::header::COOKIE, junk.parse().expect("value"));
            assert_eq!(super::wanted(&c, &headers), None, "{junk}");
        }
    }

    #[test]
    fn ids_are_stable_and_differ_by_upstream_and_backend() {
        assert_eq!(
            backend_id("app", "10.0.0.1:80"),
            backend_id("app", "10.0.0.1:80")
        );
        assert_ne!(
            backend_id("app", "10.0.0.1:80"),
            backend_id("app", "10.0.0.2:80")
        );
        assert_ne!(
            backend_id("app", "10.0.0.1:80"),
            backend_id("api", "10.0.0.1:80")
        );
    }
}
