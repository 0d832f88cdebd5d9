//! `auth.basic`: `Authorization: Basic` against an htpasswd file's bcrypt entries. bcrypt
//! is slow on purpose (tens of milliseconds), so a verification runs on the blocking pool,
//! a few at a time, and its result (pass or fail) is remembered per credential for five
//! minutes: a client that sends the same good password on every request costs one
//! verification, and one that repeats a wrong one cannot make the gateway burn CPU on it.
//! Requests that arrive together with the same credential share one verification.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use http::HeaderValue;
use parking_lot::Mutex;
use pingora_proxy::Session;
use tokio::sync::{OnceCell, Semaphore};

use super::{authorization, digest, unauthorized, Digest, Remembered, REMEMBERED};
use crate::config::BasicAuthConfig;
use crate::filters::RequestFilter;
use crate::http::answer::{Reason, Stop};
use crate::http::passage::Passage;

/// How long a verification's result is reused.
const REMEMBER: Duration = Duration::from_secs(300);
/// Verifications running at once (each holds a blocking thread for its duration).
const AT_ONCE: usize = 4;

/// A verification's result: the user's name when the password was right.
type Verdict = Option<Arc<str>>;

pub struct Basic {
    users: HashMap<String, String>,
    /// Checked for a user that does not exist (its result ignored), so that the answer
    /// takes as long as for one that does: the first user's hash.
    decoy: String,
    challenge: HeaderValue,
    /// Verdicts by credential digest: the user's name when it passed.
    verdicts: Remembered<Verdict>,
    /// Verifications under way, by credential digest.
    pending: Mutex<HashMap<Digest, Arc<OnceCell<Verdict>>>>,
    running: Arc<Semaphore>,
}

impl Basic {
    pub fn new(c: &BasicAuthConfig) -> Basic {
        let realm = c.realm.replace(['"', '\\'], "");
        Basic {
            users: c.users.iter().cloned().collect(),
            decoy: c.users.first().map(|(_, h)| h.clone()).unwrap_or_default(),
            challenge: HeaderValue::from_str(&format!("Basic realm=\"{realm}\""))
                .unwrap_or(HeaderValue::from_static("Basic")),
            verdicts: Remembered::new(REMEMBERED, REMEMBER),
            pending: Mutex::new(HashMap::new()),
            running: Arc::new(Semaphore::new(AT_ONCE)),
        }
    }

    /// The user a credential proves, if any.
    async fn verify(&self, credential: &str) -> Option<Arc<str>> {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(credential)
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, password) = text.split_once(':')?;
        let key = digest(&[b"basic", user.as_bytes(), password.as_bytes()]);
        if let Some(verdict) = self.verdicts.get(&key) {
            return verdict;
        }
        // Requests that bring the same credential at once wait for one verification.
        let cell = Arc::clone(self.pending.lock().entry(key).or_default());
        let verdict = cell
            .get_or_init(|| self.check(user, password))
            .await
            .clone();
        self.verdicts.put(key, verdict.clone());
        let mut pending = self.pending.lock();
        if pending.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            pending.remove(&key);
        }
        verdict
    }

    /// One bcrypt verification, on the blocking pool.
    async fn check(&self, user: &str, password: &str) -> Option<Arc<str>> {
        let (hash, known) = match self.users.get(user) {
            Some(h) => (h.clone(), true),
            None => (self.decoy.clone(), false),
        };
        let permit = Arc::clone(&self.running).acquire_owned().await.ok()?;
        let password = password.to_string();
        let matched = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            bcrypt::verify(password, &hash).unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        (matched && known).then(|| Arc::from(user))
    }
}

#[async_trait]
impl RequestFilter for Basic {
    async fn request(&self, session: &mut Session, pass: &mut Passage) -> Result<(), Stop> {
        let credential = authorization(session.req_header(), "basic").map(str::to_string);
        let user = match credential {
            Some(c) => self.verify(&c).await,
            None => None,
        };
        match user {
            Some(user) => {
                pass.client.identity = Some(user);
                Ok(())
            }
            None => Err(unauthorized(Reason::Credential, self.challenge.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_good_password_passes_and_a_wrong_one_does_not() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let b = Basic::new(&BasicAuthConfig {
            realm: "api".into(),
            users: vec![("alice".into(), hash)],
        });
        let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(
            b.verify(&enc("alice:s3cret")).await.as_deref(),
            Some("alice")
        );
        assert_eq!(
            b.verify(&enc("alice:s3cret")).await.as_deref(),
            Some("alice")
        );
        assert_eq!(b.verify(&enc("alice:wrong")).await, None);
        assert_eq!(b.verify(&enc("bob:s3cret")).await, None);
        assert_eq!(b.verify("not base64!").await, None);
        assert_eq!(b.challenge, "Basic realm=\"api\"");
    }
}
