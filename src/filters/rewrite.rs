//! `rewrite:`: the path the upstream sees, made from the request's (normalised) path by a
//! regex and a template with its captures (`$1`, `${name}`). The result is normalised
//! again like a client's path, so a template cannot smuggle a `..` back in: a result that
//! climbs above the root, or is not a path, is refused with 400.

use async_trait::async_trait;
use pingora_proxy::Session;

use super::RequestFilter;
use crate::config::EncodedSlashes;
use crate::config::RewriteConfig;
use crate::edge::path;
use crate::http::answer::{Stop, StopBody};
use crate::http::passage::Passage;

pub struct Rewrite {
    regex: regex::Regex,
    to: String,
}

impl Rewrite {
    pub fn new(config: &RewriteConfig) -> Rewrite {
        Rewrite {
            regex: config.regex.clone(),
            to: config.to.clone(),
        }
    }

    /// The upstream's path for `path`: `Ok(None)` when the regex does not match (the path
    /// goes on unchanged).
    pub fn apply(&self, path: &str) -> Result<Option<String>, path::PathError> {
        let Some(caps) = self.regex.captures(path) else {
            return Ok(None);
        };
        let mut out = String::with_capacity(path.len() + self.to.len());
        // Only the matched part is replaced, like sed's `s///`.
        let whole = caps.get(0).map_or(0..0, |m| m.range());
        out.push_str(&path[..whole.start]);
        caps.expand(&self.to, &mut out);
        out.push_str(&path[whole.end..]);
        if !out.starts_with('/') {
            out.insert(0, '/');
        }
        match path::normalize(&out, EncodedSlashes::Keep)? {
            Some(normal) => Ok(Some(normal)),
            None => Ok(Some(out)),
        }
    }
}

#[async_trait]
impl RequestFilter for Rewrite {
    async fn request(&self, session: &mut Session, pass: &mut Passage) -> Result<(), Stop> {
        match self.apply(session.req_header().uri.path()) {
            Ok(path) => {
                pass.upstream_path = path;
                Ok(())
            }
            Err(e) => Err(Stop {
                status: 400,
                headers: Vec::new(),
                body: StopBody::Error(e.message()),
                denied: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(regex: &str, to: &str) -> Rewrite {
        Rewrite {
            regex: regex::Regex::new(regex).unwrap(),
            to: to.to_string(),
        }
    }

    #[test]
    fn captures_fill_the_template_and_the_result_is_normalised() {
        let r = rw("^/admin-api/v1/(.*)$", "/v1/$1");
        assert_eq!(
            r.apply("/admin-api/v1/users/7").unwrap().as_deref(),
            Some("/v1/users/7")
        );
        assert_eq!(r.apply("/other").unwrap(), None);
        let named = rw("^/u/(?P<id>[0-9]+)$", "/users/${id}/profile");
        assert_eq!(
            named.apply("/u/42").unwrap().as_deref(),
            Some("/users/42/profile")
        );
        // A template that climbs out is refused, one that walks back in is resolved.
        let climb = rw("^/p/(.*)$", "/../$1");
        assert!(climb.apply("/p/x").is_err());
        let dots = rw("^/p/(.*)$", "/a/../b/$1");
        assert_eq!(dots.apply("/p/x").unwrap().as_deref(), Some("/b/x"));
        let doubled = rw("^/(.)(.*)$", "/$1$1/$2");
        // Captures can make a dot segment of their own: refused as well.
        assert!(doubled.apply("/.x").is_err());
    }
}
