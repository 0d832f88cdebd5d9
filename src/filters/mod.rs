//! Each route's chain of request filters: small steps built once from the route's
//! configuration (at start and at each reload) behind one trait, [`RequestFilter`], so
//! that `proxy.rs` runs a route's chain in one call whatever it holds. In order:
//!
//! 1. [`access::Addresses`] (`access:`): the client's address against `deny`, then `allow`
//!    (403);
//! 2. [`cors::Cors`] (`cors:`): a preflight is answered here (a browser sends it without
//!    credentials, so before `auth`); an allowed origin is remembered for the answer;
//! 3. [`auth`] (`auth:`, one kind): `basic`, `api_key`, `jwt` or `forward` (401, or the
//!    auth service's own 401/403, or 503 when it cannot decide); on success the identity
//!    is set on the request's [`Client`] and headers the route names are set;
//! 4. [`plugins`] (`plugins:`): filters the program registered, in the route's order (they
//!    see the identity `auth` found);
//! 5. [`rewrite::Rewrite`] (`rewrite:`): the path the upstream will see, normalised again;
//! 6. the rate limit (`rate_limit:`, `crate::ratelimit::step`): 429, or the tokens left for
//!    the answer's `X-RateLimit-*` headers;
//! 7. the split (`split:`, `crate::routing::split`): which upstream the request goes to.
//!
//! The gateway builds the last two around what it keeps across reloads (the route's
//! limiter, its upstreams) and hands them to [`Chain::build`].
//!
//! The chain runs after routing and before anything leaves the gateway: no upstream,
//! mirror, fallback, broadcast target or cache hit sees a request a filter stopped. Each
//! filter may also add to the answer ([`RequestFilter::response`]): CORS headers go on
//! upstream answers and on the gateway's own (a 401 a browser script must be able to read).
//! The chain is built once per configuration; a route without any of these steps has an
//! empty chain, and the proxy skips it.

pub mod access;
pub mod auth;
pub mod cors;
pub mod plugins;
pub mod rewrite;

use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::connectors::http::Connector;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use prometheus::IntCounter;

use crate::config::RouteConfig;
use crate::http::answer::{Reason, Stop};
use crate::http::passage::Passage;
use crate::observe::metrics::Metrics;

/// One step of a route's chain.
#[async_trait]
pub trait RequestFilter: Send + Sync {
    /// Looks at the request, and may change it (headers set from a credential) or the
    /// passage (identity, rewritten path); `Err` answers the request instead.
    async fn request(&self, session: &mut Session, pass: &mut Passage) -> Result<(), Stop>;

    /// Adds to the answer, whoever gave it (upstream, cache or gateway).
    fn response(&self, _pass: &Passage, _resp: &mut ResponseHeader) {}
}

/// What a chain is built with.
pub struct Build<'a> {
    pub metrics: &'a Arc<Metrics>,
    /// Sends the gateway's own requests (forward auth, JWKS URLs).
    pub connector: &'a Arc<Connector>,
}

/// A route's filters, in order, and its refusal counters.
pub struct Chain {
    filters: Vec<Box<dyn RequestFilter>>,
    denied: [IntCounter; 4],
}

impl Chain {
    /// The chain of `route`'s `access`, `cors`, `auth`, `plugins` and `rewrite`, then the
    /// steps the gateway made (`rate_limit`, `split`); empty when it has none of them (then
    /// [`Chain::is_empty`], and the proxy skips it). `Err`: a plugin's constructor refused
    /// its `config`.
    pub fn build(
        route: &RouteConfig,
        with: &Build,
        then: Vec<Box<dyn RequestFilter>>,
    ) -> Result<Chain, String> {
        let mut filters: Vec<Box<dyn RequestFilter>> = Vec::new();
        if let Some(list) = &route.access {
            filters.push(Box::new(access::Addresses::new(list)));
        }
        if let Some(cors) = &route.cors {
            filters.push(Box::new(cors::Cors::new(cors)));
        }
        if let Some(auth) = &route.auth {
            filters.push(auth::build(auth, with));
        }
        for (i, plugin) in route.plugins.iter().enumerate() {
            let filter = plugins::build(plugin)
                .map_err(|why| format!("route {}: plugins[{i}]: {why}", route.label))?;
            filters.push(filter);
        }
        if let Some(rewrite) = &route.rewrite {
            filters.push(Box::new(rewrite::Rewrite::new(rewrite)));
        }
        filters.extend(then);
        let denied = Reason::ALL.map(|r| {
            with.metrics
                .access_denied
                .with_label_values(&[&route.label, r.label()])
        });
        Ok(Chain { filters, denied })
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// Runs the filters in order until one stops the request; a refusal is counted.
    pub async fn run(&self, session: &mut Session, pass: &mut Passage) -> Result<(), Stop> {
        for f in &self.filters {
            if let Err(stop) = f.request(session, pass).await {
                if let Some(reason) = stop.denied {
                    self.denied[reason as usize].inc();
                }
                return Err(stop);
            }
        }
        Ok(())
    }

    /// Every filter's additions to an answer.
    pub fn response(&self, pass: &Passage, resp: &mut ResponseHeader) {
        for f in &self.filters {
            f.response(pass, resp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_proxy::Session;

    /// A plugin that notes, on each answer, its name and whether CORS had run before it.
    struct Note(&'static str);

    #[async_trait]
    impl RequestFilter for Note {
        async fn request(&self, _session: &mut Session, _pass: &mut Passage) -> Result<(), Stop> {
            Ok(())
        }

        fn response(&self, _pass: &Passage, resp: &mut ResponseHeader) {
            let cors_first = resp
                .headers
                .contains_key(http::header::ACCESS_CONTROL_ALLOW_ORIGIN);
            let _ = resp.append_header("x-step", format!("{}:{cors_first}", self.0));
        }
    }

    /// The chain of each route of `yaml`.
    fn chains(yaml: &str) -> Vec<Result<Chain, String>> {
        let config = crate::config::from_yaml(yaml, "test").expect("valid configuration");
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let connector = Arc::new(Connector::new(None));
        let with = Build {
            metrics: &metrics,
            connector: &connector,
        };
        config
            .routes
            .iter()
            .map(|r| Chain::build(r, &with, Vec::new()))
            .collect()
    }

    #[test]
    fn a_chain_runs_cors_then_the_plugins_in_the_routes_order() {
        plugins::register("note-one", |_| Ok(Box::new(Note("one"))));
        plugins::register("note-two", |_| Ok(Box::new(Note("two"))));
        let yaml = "listen: 127.0.0.1:1\nupstreams:\n  u:\n    backends: [127.0.0.1:9001]\n\
            routes:\n  - match: { prefix: / }\n    upstream: u\n    cors: { origins: [\"https://app.example\"] }\n    \
            plugins: [{ name: note-two }, { name: note-one }]\n";
        let chain = chains(yaml).remove(0).expect("chain");
        assert!(!chain.is_empty());
        let pass = Passage {
            origin: Some(http::HeaderValue::from_static("https://app.example")),
            ..Passage::default()
        };
        let mut resp = ResponseHeader::build(200, None).expect("answer");
        chain.response(&pass, &mut resp);
        let steps: Vec<&str> = resp
            .headers
            .get_all("x-step")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        assert_eq!(steps, ["two:true", "one:true"]);
    }

    #[test]
    fn a_route_without_steps_has_an_empty_chain_and_an_unknown_plugin_is_named() {
        let yaml = "listen: 127.0.0.1:1\nupstreams:\n  u:\n    backends: [127.0.0.1:9001]\n\
            routes:\n  - { match: { prefix: /a }, upstream: u }\n  \
            - { match: { prefix: /b }, upstream: u, plugins: [{ name: nowhere }] }\n";
        let mut built = chains(yaml);
        assert!(built.remove(0).expect("chain").is_empty());
        let Err(why) = built.remove(0) else {
            panic!("an unknown plugin was built");
        };
        assert!(
            why.contains("no filter is registered as \"nowhere\""),
            "{why}"
        );
    }
}
