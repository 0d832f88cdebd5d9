//! File types → runtime model. Each section and each list item is deserialized on its own,
//! so one bad route does not hide the problems of the next; then names, addresses, ranges
//! and cross references are checked. Everything found is returned at once.
//!
//! One module per part of the file: [`process`] (server, admin, clients, redis, resolver,
//! spool), [`listen`], [`upstream`], [`route`]; [`lines`] turns key paths into line
//! numbers. This module takes the top-level sections, checks what spans them, and holds
//! the [`Checker`] they all report to.

mod access;
mod compress;
mod lines;
mod listen;
mod process;
mod route;
mod upstream;
mod words;

pub use access::jwks;
use access::*;
use compress::*;
pub(super) use lines::attach_lines;
use listen::*;
use process::*;
use route::*;
use upstream::*;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use pingora_core::server::configuration::ServerConf;
use serde::de::DeserializeOwned;
use serde_yaml::{Mapping, Value};

use super::file::*;
use super::model::*;
use super::ConfigError;

/// Collects errors under key paths.
#[derive(Default)]
struct Checker {
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
}

impl Checker {
    fn err(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError::new(path, message));
    }

    /// Something legal but probably unwanted: printed by `-t` and at start-up.
    fn warn(&mut self, path: &str, message: impl Into<String>) {
        self.warnings.push(ConfigError::new(path, message));
    }

    /// Deserializes `value` as `T`, reporting each failure under `path` plus the inner path.
    /// serde stops at the first error, so the offending key is removed and parsing retried,
    /// until it succeeds or cannot go on: every problem in the item gets its own line.
    fn parse<T: DeserializeOwned>(&mut self, path: &str, mut value: Value) -> Option<T> {
        let mut failed = false;
        for _ in 0..64 {
            match serde_path_to_error::deserialize::<_, T>(value.clone()) {
                Ok(v) => return Some(v),
                Err(e) => {
                    let inner = e.path().clone();
                    let message = words::in_words(&e.into_inner().to_string());
                    // A field we removed ourselves is now "missing": already reported.
                    if failed && message.ends_with("is required here") {
                        return None;
                    }
                    let rendered = inner.to_string();
                    self.err(
                        &join(path, if rendered == "." { "" } else { &rendered }),
                        message,
                    );
                    failed = true;
                    if !remove_at(&mut value, &inner) {
                        return None;
                    }
                }
            }
        }
        None
    }
}

/// Removes the value at `path` inside `value`; false if there is nothing to remove.
fn remove_at(value: &mut Value, path: &serde_path_to_error::Path) -> bool {
    use serde_path_to_error::Segment;
    let segments: Vec<&Segment> = path.iter().collect();
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut node = value;
    for seg in parents {
        let next = match (seg, node) {
            (Segment::Seq { index }, Value::Sequence(items)) => items.get_mut(*index),
            (Segment::Map { key }, Value::Mapping(map)) => map.get_mut(key.as_str()),
            _ => None,
        };
        match next {
            Some(n) => node = n,
            None => return false,
        }
    }
    match (last, node) {
        (Segment::Map { key }, Value::Mapping(map)) => map.remove(key.as_str()).is_some(),
        (Segment::Seq { index }, Value::Sequence(items)) if *index < items.len() => {
            items.remove(*index);
            true
        }
        _ => false,
    }
}

fn join(base: &str, rest: &str) -> String {
    match (base.is_empty(), rest.is_empty()) {
        (_, true) => base.to_string(),
        (true, false) => rest.to_string(),
        (false, false) if rest.starts_with('[') => format!("{base}{rest}"),
        (false, false) => format!("{base}.{rest}"),
    }
}

/// The top-level sections of the file, taken one by one: what no section took is an
/// unknown key.
struct Sections {
    root: Mapping,
    taken: Vec<&'static str>,
}

impl Sections {
    /// The section `key`; `None` when absent or null.
    fn take(&mut self, key: &'static str) -> Option<Value> {
        self.taken.push(key);
        match self.root.remove(key) {
            None | Some(Value::Null) => None,
            v => v,
        }
    }

    /// The section `key` deserialized as `T` (its problems reported); `None` when absent.
    fn parse<T: DeserializeOwned>(&mut self, ck: &mut Checker, key: &'static str) -> Option<T> {
        self.take(key).and_then(|v| ck.parse(key, v))
    }

    /// Reports each key no section took, ahead of the sections' own problems.
    fn report_unknown(self, ck: &mut Checker) {
        let expected = self.taken.join(", ");
        let unknown = self.root.keys().map(|key| {
            let name = key.as_str().unwrap_or("?");
            let message = match words::nearest(name, self.taken.iter().copied()) {
                Some(near) => {
                    format!("unknown key; did you mean `{near}`? (expected one of {expected})")
                }
                None => format!("unknown key, expected one of {expected}"),
            };
            ConfigError::new(name, message)
        });
        ck.errors.splice(0..0, unknown);
    }
}

/// Parses and validates configuration text into the runtime model.
pub(super) fn build(text: &str) -> Result<Config, Vec<ConfigError>> {
    let mut ck = Checker::default();
    let root: Value = match serde_yaml::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            let (line, column) = (
                e.location().map(|l| l.line()),
                e.location().map(|l| l.column()),
            );
            let message = words::yaml_in_words(&e.to_string(), text, line, column);
            let mut err = ConfigError::new("", format!("invalid YAML: {message}"));
            err.line = line;
            return Err(vec![err]);
        }
    };
    let root = match root {
        Value::Mapping(m) => m,
        Value::Null => Mapping::new(),
        _ => {
            return Err(vec![ConfigError::new(
                "",
                "the file must be a YAML mapping",
            )])
        }
    };
    let mut sections = Sections {
        root,
        taken: Vec::new(),
    };
    let server = build_server(&mut ck, sections.take("server"));
    let listen = build_listen(&mut ck, sections.take("listen"));
    let admin = sections
        .parse::<FileAdmin>(&mut ck, "admin")
        .and_then(|a| build_admin(&mut ck, a));
    let clients = sections
        .parse::<FileClients>(&mut ck, "clients")
        .map(|c| build_clients(&mut ck, c))
        .unwrap_or_default();
    let redis = sections
        .parse::<FileRedis>(&mut ck, "redis")
        .and_then(|f| build_redis(&mut ck, f));
    let resolver = sections
        .parse::<FileResolver>(&mut ck, "resolver")
        .and_then(|f| build_resolver(&mut ck, f));
    let tracing = sections
        .parse::<FileTracing>(&mut ck, "tracing")
        .and_then(|f| build_tracing(&mut ck, f));
    let spool = sections
        .parse::<FileSpool>(&mut ck, "spool")
        .and_then(|f| build_spool(&mut ck, f));
    let state = sections
        .parse::<FileState>(&mut ck, "state")
        .map(|f| build_state(&mut ck, f))
        .unwrap_or_default();
    let cache_max_size = sections
        .parse::<FileCache>(&mut ck, "cache")
        .and_then(|c| c.max_size)
        .map_or(DEFAULT_CACHE_MAX_SIZE, |s| {
            if s.0 < MIN_CACHE_MAX_SIZE {
                ck.err("cache.max_size", "must be at least 1MiB");
            }
            s.0
        });
    let defaults: FileDefaults = sections.parse(&mut ck, "defaults").unwrap_or_default();
    let upstreams = sections
        .parse::<Mapping>(&mut ck, "upstreams")
        .map(|m| build_upstreams(&mut ck, m))
        .unwrap_or_default();
    let routes = match sections.take("routes") {
        None => {
            ck.err("routes", "at least one route is required");
            Vec::new()
        }
        Some(v) => ck
            .parse::<Vec<Value>>("routes", v)
            .map(|items| build_routes(&mut ck, items, &listen, &upstreams, &defaults))
            .unwrap_or_default(),
    };
    sections.report_unknown(&mut ck);

    let shared = routes.iter().position(|r| {
        r.rate_limit
            .as_ref()
            .is_some_and(|l| l.store == LimitStore::Redis)
    });
    let spool_in_redis = matches!(
        spool.as_ref().map(|s| &s.store),
        Some(SpoolStore::Redis { .. })
    );
    match (shared, &redis) {
        (Some(i), None) => ck.err(
            &format!("routes[{i}].rate_limit.store"),
            "store: redis needs a top-level `redis:` section (url, pool, timeout)",
        ),
        (None, Some(_)) if !spool_in_redis => ck.warn(
            "redis",
            "neither a rate_limit nor the spool uses `store: redis`: no connection to Redis is made",
        ),
        _ => {}
    }
    if spool_in_redis && redis.is_none() {
        ck.err(
            "spool.store",
            "store: redis needs a top-level `redis:` section (url, pool, timeout)",
        );
    }
    let in_memory = spool
        .as_ref()
        .is_none_or(|s| matches!(s.store, SpoolStore::Memory));
    if in_memory {
        if let Some(i) = routes
            .iter()
            .position(|r| matches!(r.kind, RouteKind::Broadcast { .. }))
        {
            ck.warn(
                &format!("routes[{i}]"),
                "broadcast with the spool in memory only (no `spool:`, or `store: memory`): \
                 a stop or crash loses the accepted requests not yet delivered",
            );
        }
    }
    if ck.errors.is_empty() {
        Ok(Config {
            server,
            listen,
            admin,
            clients,
            warnings: ck.warnings,
            default_access_log: defaults.access_log.unwrap_or(AccessLog::Json),
            upstreams: upstreams.into_iter().filter_map(|(_, u)| u).collect(),
            routes,
            spool,
            cache_max_size,
            redis,
            resolver,
            tracing,
            state,
        })
    } else {
        Err(ck.errors)
    }
}

fn positive(ck: &mut Checker, path: &str, d: Duration) {
    if d.is_zero() {
        ck.err(path, "must be longer than zero");
    }
}

fn at_least_one(ck: &mut Checker, path: &str, n: u32) -> u32 {
    if n == 0 {
        ck.err(path, "must be at least 1");
    }
    n.max(1)
}
