//! A complete gateway with a filter of its own: `fanout` as a library, with a tenant check
//! registered under the name `tenant`. A route uses it with
//!
//! ```yaml
//! routes:
//!   - match: { prefix: /api/ }
//!     upstream: api
//!     plugins:
//!       - name: tenant
//!         config: { header: X-Tenant, allow: [acme, globex] }
//! ```
//!
//! A request whose `X-Tenant` is missing or not allowed gets 403 (counted in
//! `fanout_access_denied_total{reason="credential"}`); an allowed one goes on, and every
//! answer on the route carries `x-tenant-checked: yes`. `-t` checks the `config` through the
//! filter's own constructor. Everything else is the `fanout` command as it is:
//!
//! ```sh
//! cargo run --release --example custom_filter -- -c gateway.yaml
//! ```

use std::collections::HashSet;

use async_trait::async_trait;
use fanout::filters::RequestFilter;
use fanout::http::answer::{Reason, Stop};
use fanout::http::passage::Passage;
use http::{HeaderName, HeaderValue};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

/// Lets a request on only when its tenant header names an allowed tenant.
struct Tenant {
    header: HeaderName,
    allow: HashSet<String>,
}

impl Tenant {
    /// From the route's `config: { header: NAME, allow: [TENANT, ...] }`.
    fn from_config(config: &serde_yaml::Value) -> Result<Tenant, String> {
        let header = config
            .get("header")
            .and_then(|h| h.as_str())
            .ok_or("config.header: a header name is required")?;
        let header = HeaderName::try_from(header)
            .map_err(|_| format!("config.header: {header:?} is not a header name"))?;
        let allow: HashSet<String> = config
            .get("allow")
            .and_then(|a| a.as_sequence())
            .ok_or("config.allow: a list of tenants is required")?
            .iter()
            .map(|t| t.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or("config.allow: every tenant is a string")?;
        if allow.is_empty() {
            return Err("config.allow: at least one tenant is required".into());
        }
        Ok(Tenant { header, allow })
    }

    fn tenant<'a>(&self, headers: &'a http::HeaderMap) -> Option<&'a str> {
        let value = headers.get(&self.header)?.to_str().ok()?;
        self.allow.contains(value).then_some(value)
    }
}

#[async_trait]
impl RequestFilter for Tenant {
    async fn request(&self, session: &mut Session, _pass: &mut Passage) -> Result<(), Stop> {
        match self.tenant(&session.req_header().headers) {
            Some(_) => Ok(()),
            None => Err(Stop::denied(403, Reason::Credential, "unknown tenant")),
        }
    }

    fn response(&self, _pass: &Passage, resp: &mut ResponseHeader) {
        let _ = resp.insert_header("x-tenant-checked", HeaderValue::from_static("yes"));
    }
}

fn main() {
    fanout::filters::plugins::register("tenant", |config| {
        Ok(Box::new(Tenant::from_config(config)?))
    });
    std::process::exit(fanout::app::main());
}
