//! File types → runtime model. Each section and each list item is deserialized on its own,
//! so one bad route does not hide the problems of the next; then names, addresses, ranges
//! and cross references are checked. Everything found is returned at once.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use pingora_core::server::configuration::ServerConf;
use serde::de::DeserializeOwned;
use serde_yaml::{Mapping, Value};

use super::file::*;
use super::model::*;
use super::ConfigError;

const TOP_KEYS: [&str; 11] = [
    "server",
    "listen",
    "admin",
    "clients",
    "redis",
    "resolver",
    "spool",
    "cache",
    "defaults",
    "upstreams",
    "routes",
];

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
                    let message = e.into_inner().to_string();
                    // A field we removed ourselves is now "missing": already reported.
                    if failed && message.starts_with("missing field") {
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

/// Parses and validates configuration text into the runtime model.
pub(super) fn build(text: &str) -> Result<Config, Vec<ConfigError>> {
    let mut ck = Checker::default();
    let root: Value = match serde_yaml::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            let mut err = ConfigError::new("", format!("invalid YAML: {e}"));
            err.line = e.location().map(|l| l.line());
            return Err(vec![err]);
        }
    };
    let mut root = match root {
        Value::Mapping(m) => m,
        Value::Null => Mapping::new(),
        _ => {
            return Err(vec![ConfigError::new(
                "",
                "the file must be a YAML mapping",
            )])
        }
    };
    for key in root.keys() {
        let name = key.as_str().unwrap_or("?");
        if !TOP_KEYS.contains(&name) {
            ck.err(
                name,
                format!("unknown key, expected one of {}", TOP_KEYS.join(", ")),
            );
        }
    }

    let server = build_server(&mut ck, root.remove("server"));
    let listen: Vec<Listener> = match root.remove("listen") {
        None | Some(Value::Null) => {
            ck.err("listen", "at least one listen address is required");
            Vec::new()
        }
        Some(Value::Sequence(items)) => items
            .into_iter()
            .enumerate()
            .flat_map(|(i, v)| build_listener(&mut ck, &format!("listen[{i}]"), v))
            .collect(),
        Some(v) => build_listener(&mut ck, "listen", v),
    };
    let mut seen = HashSet::new();
    for l in &listen {
        if !seen.insert(l.addr) {
            ck.err("listen", format!("{} is listed twice", l.addr));
        }
    }
    let admin = match root.remove("admin") {
        None | Some(Value::Null) => None,
        Some(v) => ck
            .parse::<FileAdmin>("admin", v)
            .and_then(|a| build_admin(&mut ck, a)),
    };
    let clients = match root.remove("clients") {
        None | Some(Value::Null) => ClientsConfig::default(),
        Some(v) => ck
            .parse::<FileClients>("clients", v)
            .map(|c| build_clients(&mut ck, c))
            .unwrap_or_default(),
    };
    let cache_max_size = match root.remove("cache") {
        None | Some(Value::Null) => DEFAULT_CACHE_MAX_SIZE,
        Some(v) => ck
            .parse::<FileCache>("cache", v)
            .and_then(|c| c.max_size)
            .map_or(DEFAULT_CACHE_MAX_SIZE, |s| {
                if s.0 < 1024 * 1024 {
                    ck.err("cache.max_size", "must be at least 1MiB");
                }
                s.0
            }),
    };
    let redis = match root.remove("redis") {
        None | Some(Value::Null) => None,
        Some(v) => ck
            .parse::<FileRedis>("redis", v)
            .and_then(|f| build_redis(&mut ck, f)),
    };
    let resolver = match root.remove("resolver") {
        None | Some(Value::Null) => None,
        Some(v) => ck
            .parse::<FileResolver>("resolver", v)
            .and_then(|f| build_resolver(&mut ck, f)),
    };
    let spool = match root.remove("spool") {
        None | Some(Value::Null) => None,
        Some(v) => ck
            .parse::<FileSpool>("spool", v)
            .and_then(|f| build_spool(&mut ck, f)),
    };
    let defaults = match root.remove("defaults") {
        None | Some(Value::Null) => FileDefaults::default(),
        Some(v) => ck.parse("defaults", v).unwrap_or_default(),
    };

    let upstreams = match root.remove("upstreams") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => ck
            .parse::<Mapping>("upstreams", v)
            .map(|m| build_upstreams(&mut ck, m))
            .unwrap_or_default(),
    };
    let routes = match root.remove("routes") {
        None | Some(Value::Null) => {
            ck.err("routes", "at least one route is required");
            Vec::new()
        }
        Some(v) => ck
            .parse::<Vec<Value>>("routes", v)
            .map(|items| build_routes(&mut ck, items, &upstreams, &defaults))
            .unwrap_or_default(),
    };

    let shared = routes.iter().position(|r| {
        r.rate_limit
            .as_ref()
            .is_some_and(|l| l.store == LimitStore::Redis)
    });
    match (shared, &redis) {
        (Some(i), None) => ck.err(
            &format!("routes[{i}].rate_limit.store"),
            "store: redis needs a top-level `redis:` section (url, pool, timeout)",
        ),
        (None, Some(_)) => ck.warn(
            "redis",
            "no rate_limit uses `store: redis`: no connection to Redis is made",
        ),
        _ => {}
    }
    if spool.is_none() {
        if let Some(i) = routes
            .iter()
            .position(|r| matches!(r.kind, RouteKind::Broadcast { .. }))
        {
            ck.warn(
                &format!("routes[{i}]"),
                "broadcast without `spool:` keeps accepted requests in memory only: \
                 a stop or crash loses those not yet delivered",
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
        })
    } else {
        Err(ck.errors)
    }
}

/// `resolver:`: DNS servers as `IP` (port 53) or `IP:PORT`.
fn build_resolver(ck: &mut Checker, f: FileResolver) -> Option<ResolverConfig> {
    if f.nameservers.is_empty() {
        ck.err(
            "resolver.nameservers",
            "at least one DNS server is required",
        );
    }
    let nameservers = f
        .nameservers
        .iter()
        .enumerate()
        .filter_map(|(i, text)| {
            let parsed = text.parse::<SocketAddr>().ok().or_else(|| {
                text.parse::<std::net::IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, 53))
            });
            if parsed.is_none() {
                ck.err(
                    &format!("resolver.nameservers[{i}]"),
                    format!("{text:?} is not an IP address or IP:PORT"),
                );
            }
            parsed
        })
        .collect();
    let timeout = f.timeout.map_or(DEFAULT_RESOLVER_TIMEOUT, |d| d.0);
    positive(ck, "resolver.timeout", timeout);
    Some(ResolverConfig {
        nameservers,
        timeout,
    })
}

/// `redis:`: every URL must be one Redis can take (`redis://` or `redis+unix://`; checked
/// by the client library, no connection is made), the pool and the timeout sane.
fn build_redis(ck: &mut Checker, f: FileRedis) -> Option<RedisConfig> {
    let check_url = |ck: &mut Checker, path: &str, url: &str| {
        if let Err(e) = redis::Client::open(url) {
            ck.err(path, format!("{url:?} is not a Redis URL: {e}"));
        }
    };
    let server = match f.url {
        OneOrMany::One(url) => {
            check_url(ck, "redis.url", &url);
            RedisServer::Single(url)
        }
        OneOrMany::Many(urls) => {
            if urls.is_empty() {
                ck.err("redis.url", "the list of Redis Cluster nodes is empty");
            }
            for (i, url) in urls.iter().enumerate() {
                check_url(ck, &format!("redis.url[{i}]"), url);
            }
            RedisServer::Cluster(urls)
        }
    };
    let pool = f.pool.unwrap_or(DEFAULT_REDIS_POOL);
    if !(1..=1024).contains(&pool) {
        ck.err("redis.pool", "must be from 1 to 1024 connections");
    }
    let timeout = f.timeout.map_or(DEFAULT_REDIS_TIMEOUT, |d| d.0);
    if timeout.is_zero() || timeout > Duration::from_secs(10) {
        ck.err("redis.timeout", "must be more than 0 and at most 10s");
    }
    Some(RedisConfig {
        server,
        pool,
        timeout,
    })
}

/// `spool:`: the directory must be one, or be creatable (its nearest existing ancestor is
/// a writable directory).
fn build_spool(ck: &mut Checker, f: FileSpool) -> Option<SpoolConfig> {
    let dir = std::path::PathBuf::from(&f.dir);
    if f.dir.is_empty() {
        ck.err("spool.dir", "must not be empty");
        return None;
    }
    let existing = dir
        .ancestors()
        .find(|p| !p.as_os_str().is_empty() && p.exists());
    match existing.map(|p| (p, std::fs::metadata(p))) {
        Some((p, Ok(m))) if !m.is_dir() => {
            ck.err("spool.dir", format!("{} is not a directory", p.display()))
        }
        Some((p, Ok(m))) if m.permissions().readonly() => {
            ck.err("spool.dir", format!("{} is not writable", p.display()))
        }
        _ => {}
    }
    let max_size = f.max_size.map_or(DEFAULT_SPOOL_MAX_SIZE, |s| s.0);
    if max_size < 1024 * 1024 {
        ck.err("spool.max_size", "must be at least 1MiB");
    }
    Some(SpoolConfig {
        dir,
        max_size,
        fsync: f.fsync.unwrap_or(Fsync::Group),
    })
}

/// `server:` holds Pingora's `ServerConf` keys unchanged; unknown ones are refused (Pingora
/// itself would silently ignore them). Absent values get gateway defaults.
fn build_server(ck: &mut Checker, value: Option<Value>) -> ServerConf {
    let mut conf = ServerConf {
        grace_period_seconds: Some(10),
        graceful_shutdown_timeout_seconds: Some(5),
        pid_file: "/tmp/fanout.pid".into(),
        upgrade_sock: "/tmp/fanout_upgrade.sock".into(),
        threads: 0,
        ..ServerConf::default()
    };
    if let Some(Value::Mapping(given)) = value {
        let known: HashSet<String> = match serde_yaml::to_value(ServerConf::default()) {
            Ok(Value::Mapping(m)) => m
                .keys()
                .filter_map(|k| k.as_str().map(String::from))
                .collect(),
            _ => HashSet::new(),
        };
        let mut merged = match serde_yaml::to_value(&conf) {
            Ok(Value::Mapping(m)) => m,
            _ => Mapping::new(),
        };
        for (k, v) in given {
            let name = k.as_str().unwrap_or("?").to_string();
            if known.contains(&name) {
                merged.insert(k, v);
            } else {
                ck.err(&format!("server.{name}"), "unknown Pingora server setting");
            }
        }
        if let Some(parsed) = ck.parse::<ServerConf>("server", Value::Mapping(merged)) {
            conf = parsed;
        }
    } else if let Some(v) = value {
        if !v.is_null() {
            ck.err("server", "expected a mapping of Pingora server settings");
        }
    }
    if conf.threads == 0 {
        conf.threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    }
    conf
}

fn build_admin(ck: &mut Checker, admin: FileAdmin) -> Option<AdminConfig> {
    let (address, token_file) = match admin {
        FileAdmin::Address(a) => (a, None),
        FileAdmin::Full(f) => (f.address, f.token_file),
    };
    let path = if token_file.is_some() {
        "admin.address"
    } else {
        "admin"
    };
    let address = parse_listen(ck, path, &address, "IP:PORT")?;
    let token = match token_file {
        None => None,
        Some(file) => match std::fs::read_to_string(&file) {
            Ok(text) if !text.trim().is_empty() => Some(text.trim().to_string()),
            Ok(_) => {
                ck.err("admin.token_file", format!("{file} is empty"));
                None
            }
            Err(e) => {
                ck.err("admin.token_file", format!("cannot read {file}: {e}"));
                None
            }
        },
    };
    if token.is_none() && !address.ip().is_loopback() {
        ck.warn(
            path,
            format!(
                "the admin listener on {address} is reachable from other hosts and has no \
                 token_file: anyone who reaches it can read /status and /metrics"
            ),
        );
    }
    Some(AdminConfig { address, token })
}

fn build_clients(ck: &mut Checker, f: FileClients) -> ClientsConfig {
    let d = ClientsConfig::default();
    let dur = |ck: &mut Checker, key: &str, v: Option<Dur>, default: Duration| {
        let v = v.map_or(default, |d| d.0);
        positive(ck, &format!("clients.{key}"), v);
        v
    };
    let count = |ck: &mut Checker, key: &str, v: Option<usize>, default: usize, min: usize| {
        let v = v.unwrap_or(default);
        if v < min {
            ck.err(&format!("clients.{key}"), format!("must be at least {min}"));
        }
        v
    };
    let max_request_line = f
        .max_request_line
        .map_or(d.max_request_line as u64, |s| s.0);
    let max_header_bytes = f
        .max_header_bytes
        .map_or(d.max_header_bytes as u64, |s| s.0);
    // Pingora reads at most 1 MiB of head, and a head must hold at least a short request.
    const HEAD: std::ops::RangeInclusive<u64> = 64..=1024 * 1024;
    for (key, v) in [
        ("max_request_line", max_request_line),
        ("max_header_bytes", max_header_bytes),
    ] {
        if !HEAD.contains(&v) {
            ck.err(
                &format!("clients.{key}"),
                "must be between 64 bytes and 1MiB",
            );
        }
    }
    ClientsConfig {
        header_timeout: dur(ck, "header_timeout", f.header_timeout, d.header_timeout),
        body_timeout: dur(ck, "body_timeout", f.body_timeout, d.body_timeout),
        keepalive_timeout: dur(
            ck,
            "keepalive_timeout",
            f.keepalive_timeout,
            d.keepalive_timeout,
        ),
        max_connections: count(
            ck,
            "max_connections",
            f.max_connections,
            d.max_connections,
            1,
        ),
        max_connections_per_ip: count(
            ck,
            "max_connections_per_ip",
            f.max_connections_per_ip,
            d.max_connections_per_ip,
            0,
        ),
        max_request_line: max_request_line as usize,
        max_header_bytes: max_header_bytes as usize,
        max_headers: {
            let n = count(ck, "max_headers", f.max_headers, d.max_headers, 1);
            if n > 256 {
                ck.err(
                    "clients.max_headers",
                    "must be at most 256 (Pingora's own limit)",
                );
            }
            n
        },
        encoded_slashes: f.encoded_slashes.unwrap_or(d.encoded_slashes),
    }
}

/// One `listen:` entry: `"IP:PORT"`, `":PORT"` (every address: one IPv4 socket, and one
/// IPv6 socket where the host has IPv6), or `{address, tls, http2}`.
fn build_listener(ck: &mut Checker, path: &str, value: Value) -> Vec<Listener> {
    let f = match value {
        Value::String(address) => FileListener {
            address,
            tls: None,
            http2: None,
        },
        other => match ck.parse::<FileListener>(path, other) {
            Some(f) => f,
            None => return Vec::new(),
        },
    };
    let addrs: Vec<(SocketAddr, bool)> = match every_address_port(&f.address) {
        Some(port) => {
            let mut both = vec![(SocketAddr::from(([0, 0, 0, 0], port)), false)];
            if host_has_ipv6() {
                both.push((SocketAddr::from(([0u16; 8], port)), true));
            }
            both
        }
        None => parse_listen(
            ck,
            &format!("{path}.address"),
            &f.address,
            "IP:PORT or :PORT",
        )
        .map(|a| (a, false))
        .into_iter()
        .collect(),
    };
    let Some(one) = build_one_listener(ck, path, f) else {
        return Vec::new();
    };
    addrs
        .into_iter()
        .map(|(addr, v6_only)| Listener {
            addr,
            v6_only,
            ..one.clone()
        })
        .collect()
}

/// `:PORT`, as Go, the Go reverse proxy and nginx's `listen PORT` write "every address".
fn every_address_port(text: &str) -> Option<u16> {
    text.strip_prefix(':')?.parse().ok()
}

/// Whether an IPv6 socket can be bound here (a host or container without IPv6 cannot).
fn host_has_ipv6() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| std::net::TcpListener::bind("[::]:0").is_ok())
}

/// A listener's settings (TLS, h2), its address left unspecified for the caller to set.
fn build_one_listener(ck: &mut Checker, path: &str, f: FileListener) -> Option<Listener> {
    let http2 = f.http2.unwrap_or(f.tls.is_some());
    let tls = f.tls.and_then(|t| {
        let tpath = format!("{path}.tls");
        let min_tls13 = match t.min_version.as_deref() {
            None | Some("1.2") => false,
            Some("1.3") => true,
            Some(other) => {
                ck.err(
                    &format!("{tpath}.min_version"),
                    format!("min_version {other:?} is not one of \"1.2\", \"1.3\""),
                );
                false
            }
        };
        if t.certificates.is_empty() {
            ck.err(
                &format!("{tpath}.certificates"),
                "at least one certificate is required",
            );
        }
        let before = ck.errors.len();
        let certificates: Vec<_> = t
            .certificates
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let loaded = crate::tls::load_server_cert(c.cert.as_ref(), c.key.as_ref());
                loaded
                    .map_err(|e| ck.err(&format!("{tpath}.certificates[{i}]"), e))
                    .ok()
            })
            .collect();
        (ck.errors.len() == before && !certificates.is_empty()).then_some(ListenerTls {
            certificates,
            min_tls13,
        })
    });
    Some(Listener {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        v6_only: false,
        tls,
        http2,
    })
}

/// An `IP:PORT`; `expected` says what else the key takes, for the error.
fn parse_listen(ck: &mut Checker, path: &str, text: &str, expected: &str) -> Option<SocketAddr> {
    match text.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            ck.err(
                path,
                format!("invalid listen address {text:?} (expected {expected})"),
            );
            None
        }
    }
}

/// A backend as written: `IP:PORT` or `host:PORT`, either behind `http://`, or behind
/// `https://` (TLS, verified against the host name). A host name is not resolved here: it
/// stands for every address DNS gives it, looked up at start and again every
/// [`DEFAULT_DNS_INTERVAL`] ([`crate::upstream::discovery`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendAddr {
    pub target: Target,
    pub https: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Addr(SocketAddr),
    /// A host name (lower case) and a port.
    Name(String, u16),
}

pub fn parse_backend_addr(text: &str) -> Result<BackendAddr, String> {
    let t = text.trim();
    let (https, t) = match (t.strip_prefix("https://"), t.strip_prefix("http://")) {
        (Some(rest), _) => (true, rest),
        (None, Some(rest)) => (false, rest),
        (None, None) => (false, t),
    };
    let t = t.trim_end_matches('/');
    if let Ok(addr) = t.parse::<SocketAddr>() {
        return Ok(BackendAddr {
            target: Target::Addr(addr),
            https,
        });
    }
    let invalid = || format!("invalid address {text:?} (expected HOST:PORT)");
    let (host, port) = t.rsplit_once(':').ok_or_else(invalid)?;
    let port = port.parse::<u16>().map_err(|_| invalid())?;
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if !is_dns_name(&host) || port == 0 {
        return Err(invalid());
    }
    Ok(BackendAddr {
        target: Target::Name(host, port),
        https,
    })
}

/// Whether `name` is a host name: dot-separated labels of letters, digits, `-` and `_`.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// `upstreams.*.tls`, its files read and checked; `https://` backends alone stand for the
/// defaults (verify against the system's roots and each backend's name).
fn build_upstream_tls(
    ck: &mut Checker,
    path: &str,
    f: Option<FileUpstreamTls>,
    any_https: bool,
) -> Option<UpstreamTls> {
    let f = match f {
        Some(f) => f,
        None if any_https => FileUpstreamTls::default(),
        None => return None,
    };
    let ca = f.ca_file.as_ref().and_then(|file| {
        crate::tls::load_ca(file.as_ref())
            .map_err(|e| ck.err(&format!("{path}.ca_file"), e))
            .ok()
    });
    let client_cert = match (&f.client_cert, &f.client_key) {
        (Some(cert), Some(key)) => crate::tls::load_client_cert(cert.as_ref(), key.as_ref())
            .map_err(|e| ck.err(&format!("{path}.client_cert"), e))
            .ok(),
        (None, None) => None,
        _ => {
            ck.err(path, "client_cert and client_key go together");
            None
        }
    };
    if let Some(sni) = &f.sni {
        if rustls::pki_types::ServerName::try_from(sni.as_str()).is_err() {
            ck.err(
                &format!("{path}.sni"),
                format!("{sni:?} is not a host name"),
            );
        }
    }
    Some(UpstreamTls {
        sni: f.sni,
        verify: f.verify.unwrap_or(true),
        ca,
        client_cert,
    })
}

/// Every declared upstream by name; `None` where it has errors (already reported), so
/// routes naming it are not reported again.
fn build_upstreams(ck: &mut Checker, map: Mapping) -> Vec<(String, Option<UpstreamConfig>)> {
    let mut out = Vec::new();
    for (name, value) in map {
        let Some(name) = name.as_str().map(String::from) else {
            ck.err("upstreams", "upstream names must be strings");
            continue;
        };
        let path = format!("upstreams.{name}");
        let built = ck
            .parse::<FileUpstream>(&path, value)
            .and_then(|file| build_upstream(ck, &path, &name, file));
        out.push((name, built));
    }
    out
}

fn build_upstream(
    ck: &mut Checker,
    path: &str,
    name: &str,
    f: FileUpstream,
) -> Option<UpstreamConfig> {
    let before = ck.errors.len();
    let balance = f.balance.unwrap_or(Balance::RoundRobin);
    let hash_key = match (&f.hash_key, balance) {
        (None, _) => KeySource::ClientIp,
        (Some(k), Balance::ConsistentHash) => {
            match KeySource::parse(k, &["client_ip", "path", "header:NAME"]) {
                Ok(k) => k,
                Err(e) => {
                    ck.err(&format!("{path}.hash_key"), e);
                    KeySource::ClientIp
                }
            }
        }
        (Some(_), _) => {
            ck.err(
                &format!("{path}.hash_key"),
                "hash_key applies only to balance: consistent_hash",
            );
            KeySource::ClientIp
        }
    };
    if f.backends.is_empty() {
        ck.err(
            &format!("{path}.backends"),
            "at least one backend is required",
        );
    }
    let mut backends: Vec<BackendConfig> = Vec::new();
    let mut discover: Vec<DnsBackend> = Vec::new();
    let mut https: Vec<bool> = Vec::new();
    for (i, value) in f.backends.into_iter().enumerate() {
        let bpath = format!("{path}.backends[{i}]");
        let (address, weight) = match value {
            Value::String(s) => (s, None),
            Value::Mapping(m) if m.contains_key("dns") => {
                if let Some(d) = ck.parse::<FileDnsBackend>(&bpath, Value::Mapping(m)) {
                    if let Some(d) = build_dns_backend(ck, &bpath, d) {
                        add_named(ck, &bpath, &mut discover, d);
                    }
                }
                continue;
            }
            other => match ck.parse::<FileBackend>(&bpath, other) {
                Some(b) => (b.address, b.weight),
                None => continue,
            },
        };
        let weight = weight.unwrap_or(DEFAULT_WEIGHT);
        if !(1..=10_000).contains(&weight) {
            ck.err(
                &format!("{bpath}.weight"),
                format!("weight {weight} is out of range 1..=10000"),
            );
            continue;
        }
        match parse_backend_addr(&address) {
            Ok(BackendAddr {
                target: Target::Addr(addr),
                https: tls,
            }) => {
                if backends.iter().any(|seen| seen.addr == addr) {
                    ck.err(&bpath, format!("duplicate backend {addr}"));
                } else {
                    https.push(tls);
                    backends.push(BackendConfig {
                        addr,
                        weight,
                        host: None,
                    });
                }
            }
            Ok(BackendAddr {
                target: Target::Name(name, port),
                https: tls,
            }) => {
                https.push(tls);
                let d = DnsBackend {
                    name,
                    port,
                    weight,
                    interval: DEFAULT_DNS_INTERVAL,
                };
                add_named(ck, &bpath, &mut discover, d);
            }
            Err(e) => ck.err(&bpath, e),
        }
    }
    let health_check = f.health_check.map(|h| {
        let hpath = format!("{path}.health_check");
        let kind = h.kind.unwrap_or(HealthCheckType::Http);
        let check_path = h.path.unwrap_or_else(|| "/health".into());
        if kind == HealthCheckType::Http && !check_path.starts_with('/') {
            ck.err(
                &format!("{hpath}.path"),
                format!("path {check_path:?} must start with /"),
            );
        }
        if kind == HealthCheckType::Tcp && check_path != "/health" {
            ck.err(&format!("{hpath}.path"), "path applies only to type: http");
        }
        let interval = h.interval.map_or(DEFAULT_HEALTH_INTERVAL, |d| d.0);
        let timeout = h.timeout.map_or(DEFAULT_HEALTH_TIMEOUT, |d| d.0);
        positive(ck, &format!("{hpath}.interval"), interval);
        positive(ck, &format!("{hpath}.timeout"), timeout);
        let healthy_after = at_least_one(
            ck,
            &format!("{hpath}.healthy_after"),
            h.healthy_after.unwrap_or(DEFAULT_HEALTHY_AFTER),
        );
        let unhealthy_after = at_least_one(
            ck,
            &format!("{hpath}.unhealthy_after"),
            h.unhealthy_after.unwrap_or(DEFAULT_UNHEALTHY_AFTER),
        );
        HealthCheckConfig {
            kind,
            path: check_path,
            interval,
            timeout,
            healthy_after,
            unhealthy_after,
        }
    });
    let breaker = f.breaker.map(|b| {
        let bpath = format!("{path}.breaker");
        let failures = at_least_one(
            ck,
            &format!("{bpath}.failures"),
            b.failures.unwrap_or(DEFAULT_BREAKER_FAILURES),
        );
        let open = b.open.map_or(DEFAULT_BREAKER_OPEN, |d| d.0);
        let max_open = b.max_open.map_or(DEFAULT_BREAKER_MAX_OPEN, |d| d.0);
        positive(ck, &format!("{bpath}.open"), open);
        if max_open < open {
            ck.err(
                &format!("{bpath}.max_open"),
                "max_open must not be shorter than open",
            );
        }
        BreakerConfig {
            failures,
            open,
            max_open,
        }
    });
    let mut timeouts = Timeouts::default();
    if let Some(t) = f.timeouts {
        let tpath = format!("{path}.timeouts");
        for (key, given, slot) in [
            ("connect", t.connect, &mut timeouts.connect),
            ("read", t.read, &mut timeouts.read),
            ("write", t.write, &mut timeouts.write),
            ("idle", t.idle, &mut timeouts.idle),
            ("tunnel", t.tunnel, &mut timeouts.tunnel),
        ] {
            if let Some(d) = given {
                positive(ck, &format!("{tpath}.{key}"), d.0);
                *slot = d.0;
            }
        }
        if t.tunnel.is_none() {
            // Like HAProxy's `timeout tunnel`, it falls back to the read timeout.
            timeouts.tunnel = timeouts.read;
        }
    }
    let retries = f.retries.unwrap_or(DEFAULT_RETRIES);
    if retries > 16 {
        ck.err(
            &format!("{path}.retries"),
            format!("retries {retries} is out of range 0..=16"),
        );
    }
    if https.contains(&true) && https.contains(&false) && f.tls.is_none() {
        ck.err(
            &format!("{path}.backends"),
            "https:// and plain backends are mixed: one upstream speaks one protocol \
             (write every backend https://, or set tls:)",
        );
    }
    let tls = build_upstream_tls(ck, &format!("{path}.tls"), f.tls, https.contains(&true));
    let protocol = f.protocol.unwrap_or(Protocol::H1);
    (ck.errors.len() == before).then(|| UpstreamConfig {
        name: name.to_string(),
        tls,
        protocol,
        balance,
        hash_key,
        backends,
        discover,
        health_check,
        breaker,
        timeouts,
        retries,
    })
}

/// Adds a backend found by name, unless the same name and port came before.
fn add_named(ck: &mut Checker, path: &str, discover: &mut Vec<DnsBackend>, d: DnsBackend) {
    if discover
        .iter()
        .any(|seen| seen.name == d.name && seen.port == d.port)
    {
        ck.err(path, format!("duplicate backend {}:{}", d.name, d.port));
    } else {
        discover.push(d);
    }
}

/// `{ dns: NAME, port: P, interval: I, weight: W }`: the name is looked up at start and
/// then every interval (not now: `-t` does not need the DNS).
fn build_dns_backend(ck: &mut Checker, path: &str, d: FileDnsBackend) -> Option<DnsBackend> {
    let before = ck.errors.len();
    let name = d.dns.trim().trim_end_matches('.').to_ascii_lowercase();
    if !is_dns_name(&name) {
        ck.err(
            &format!("{path}.dns"),
            format!("{:?} is not a DNS name", d.dns),
        );
    }
    if d.port == 0 {
        ck.err(&format!("{path}.port"), "port 0 is not a port");
    }
    let weight = d.weight.unwrap_or(DEFAULT_WEIGHT);
    if !(1..=10_000).contains(&weight) {
        ck.err(
            &format!("{path}.weight"),
            format!("weight {weight} is out of range 1..=10000"),
        );
    }
    let interval = d.interval.map_or(DEFAULT_DNS_INTERVAL, |i| i.0);
    if interval < MIN_DNS_INTERVAL {
        ck.err(&format!("{path}.interval"), "must be at least 100ms");
    }
    (ck.errors.len() == before).then_some(DnsBackend {
        name,
        port: d.port,
        weight,
        interval,
    })
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

fn build_routes(
    ck: &mut Checker,
    items: Vec<Value>,
    upstreams: &[(String, Option<UpstreamConfig>)],
    defaults: &FileDefaults,
) -> Vec<RouteConfig> {
    let lookup = |ck: &mut Checker, path: &str, name: &str| -> Option<UpstreamId> {
        let found = upstreams.iter().position(|(n, _)| n == name);
        if found.is_none() {
            ck.err(path, format!("unknown upstream {name:?}"));
        }
        found
    };
    let mut out: Vec<RouteConfig> = Vec::new();
    let mut seen: BTreeMap<(Option<String>, String), usize> = BTreeMap::new();
    for (i, value) in items.into_iter().enumerate() {
        let path = format!("routes[{i}]");
        let Some(f) = ck.parse::<FileRoute>(&path, value) else {
            continue;
        };
        let before = ck.errors.len();
        let mpath = format!("{path}.match");
        let matcher = match (f.matcher.path, f.matcher.prefix) {
            (Some(p), None) => Some(PathMatch::Exact(p)),
            (None, Some(p)) => Some(PathMatch::Prefix(p)),
            _ => {
                ck.err(&mpath, "needs exactly one of `path` (exact) and `prefix`");
                None
            }
        };
        if let Some(PathMatch::Exact(p) | PathMatch::Prefix(p)) = &matcher {
            if !p.starts_with('/') {
                ck.err(&mpath, format!("path {p:?} must start with /"));
            }
        }
        let host = f.matcher.host.map(|h| normalize_host(&h));
        if host.as_deref() == Some("") {
            ck.err(&format!("{mpath}.host"), "host must not be empty");
        }
        let methods = f.matcher.methods.map(|ms| {
            ms.iter()
                .enumerate()
                .filter_map(
                    |(j, m)| match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                        Ok(m) => Some(m),
                        Err(_) => {
                            ck.err(
                                &format!("{mpath}.methods[{j}]"),
                                format!("invalid method {m:?}"),
                            );
                            None
                        }
                    },
                )
                .collect::<Vec<_>>()
        });
        let kind = match (f.upstream, f.broadcast) {
            (Some(name), None) => {
                if f.broadcast_retry.is_some() {
                    ck.err(
                        &format!("{path}.broadcast_retry"),
                        "applies only to broadcast routes (`broadcast:`)",
                    );
                }
                let upstream = lookup(ck, &format!("{path}.upstream"), &name);
                let fallback: Vec<UpstreamId> = f
                    .fallback
                    .unwrap_or_default()
                    .iter()
                    .enumerate()
                    .filter_map(|(j, n)| lookup(ck, &format!("{path}.fallback[{j}]"), n))
                    .collect();
                upstream.map(|upstream| RouteKind::Proxy {
                    upstream,
                    fallback,
                    fallback_max_body: f
                        .fallback_max_body
                        .map_or(DEFAULT_FALLBACK_MAX_BODY, |s| s.0),
                    fallback_max_inflight: match f.fallback_max_inflight {
                        Some(0) => {
                            ck.err(
                                &format!("{path}.fallback_max_inflight"),
                                "must be at least 1",
                            );
                            0
                        }
                        n => n.unwrap_or(DEFAULT_FALLBACK_MAX_INFLIGHT),
                    },
                })
            }
            (None, Some(targets)) => {
                if targets.is_empty() {
                    ck.err(&format!("{path}.broadcast"), "needs at least one upstream");
                }
                if f.fallback.is_some() {
                    ck.err(
                        &format!("{path}.fallback"),
                        "fallback applies only to proxy routes (`upstream:`)",
                    );
                }
                let targets: Vec<BroadcastTarget> = targets
                    .into_iter()
                    .enumerate()
                    .filter_map(|(j, t)| {
                        broadcast_target(ck, &format!("{path}.broadcast[{j}]"), t, &lookup)
                    })
                    .collect();
                if targets.len() > u16::MAX as usize {
                    ck.err(&format!("{path}.broadcast"), "at most 65535 upstreams");
                }
                let mut retry = RetryPolicy::default();
                if let Some(r) = &f.broadcast_retry {
                    if let Some(n) = r.max_attempts {
                        if n == 0 {
                            ck.err(
                                &format!("{path}.broadcast_retry.max_attempts"),
                                "must be at least 1",
                            );
                        }
                        retry.max_attempts = n;
                    }
                    if let Some(d) = r.max_age {
                        positive(ck, &format!("{path}.broadcast_retry.max_age"), d.0);
                        retry.max_age = d.0;
                    }
                }
                Some(RouteKind::Broadcast { targets, retry })
            }
            _ => {
                ck.err(
                    &path,
                    "needs exactly one of `upstream` (proxy) and `broadcast`",
                );
                None
            }
        };
        let strip_prefix = f.strip_prefix.unwrap_or(false);
        if strip_prefix && !matches!(matcher, Some(PathMatch::Prefix(_))) {
            ck.err(
                &format!("{path}.strip_prefix"),
                "strip_prefix needs a `prefix` match",
            );
        }
        let request_headers =
            header_rules(ck, &format!("{path}.request_headers"), f.request_headers);
        let response_headers =
            header_rules(ck, &format!("{path}.response_headers"), f.response_headers);
        let rate_limit = f.rate_limit.map(|r| {
            let rpath = format!("{path}.rate_limit");
            if !(r.requests_per_second.is_finite()
                && r.requests_per_second >= MIN_REQUESTS_PER_SECOND)
            {
                ck.err(
                    &format!("{rpath}.requests_per_second"),
                    "must be a finite number of at least 0.0000116 (one request a day)",
                );
            }
            let burst = r
                .burst
                .unwrap_or_else(|| r.requests_per_second.ceil().max(1.0) as u32);
            let burst = at_least_one(ck, &format!("{rpath}.burst"), burst);
            let key = match r
                .key
                .as_deref()
                .map(|k| KeySource::parse(k, &["client_ip", "global", "header:NAME"]))
            {
                None => KeySource::ClientIp,
                Some(Ok(k)) => k,
                Some(Err(e)) => {
                    ck.err(&format!("{rpath}.key"), e);
                    KeySource::ClientIp
                }
            };
            if r.on_store_error.is_some() && !matches!(r.store, Some(FileLimitStore::Redis)) {
                ck.warn(
                    &format!("{rpath}.on_store_error"),
                    "applies only with `store: redis`",
                );
            }
            RateLimitConfig {
                requests_per_second: r.requests_per_second,
                burst,
                key,
                store: match r.store {
                    None | Some(FileLimitStore::Local) => LimitStore::Local,
                    Some(FileLimitStore::Redis) => LimitStore::Redis,
                },
                on_store_error: match r.on_store_error {
                    None | Some(FileOnStoreError::Allow) => OnStoreError::Allow,
                    Some(FileOnStoreError::Deny) => OnStoreError::Deny,
                },
            }
        });
        let max_body_bytes = f
            .max_body_bytes
            .or(defaults.max_body_bytes)
            .map_or(DEFAULT_MAX_BODY_BYTES, |s| s.0);
        let access_log = f
            .access_log
            .or(defaults.access_log)
            .unwrap_or(AccessLog::Json);
        let mut mirrors = Vec::new();
        for (j, m) in f.mirror.unwrap_or_default().into_iter().enumerate() {
            let mp = format!("{path}.mirror[{j}]");
            let upstream = lookup(ck, &format!("{mp}.upstream"), &m.upstream);
            let percent = m.percent.unwrap_or(DEFAULT_MIRROR_PERCENT);
            if !(0.0..=100.0).contains(&percent) {
                ck.err(
                    &format!("{mp}.percent"),
                    format!("percent {percent} is out of range 0..=100"),
                );
            }
            let sample_by = match m
                .sample_by
                .as_deref()
                .map(|k| KeySource::parse(k, &["client_ip", "header:NAME"]))
            {
                None => None,
                Some(Ok(k)) => Some(k),
                Some(Err(e)) => {
                    ck.err(&format!("{mp}.sample_by"), e);
                    None
                }
            };
            let redact_headers =
                header_names(ck, &format!("{mp}.redact_headers"), m.redact_headers);
            let headers = header_rules(ck, &format!("{mp}.headers"), m.headers);
            let max_inflight = m.max_inflight.unwrap_or(DEFAULT_MIRROR_MAX_INFLIGHT);
            if max_inflight == 0 {
                ck.err(&format!("{mp}.max_inflight"), "must be at least 1");
            }
            let timeout = m.timeout.map_or(DEFAULT_MIRROR_TIMEOUT, |d| d.0);
            positive(ck, &format!("{mp}.timeout"), timeout);
            let compare = m.compare.map(|c| {
                let cp = format!("{mp}.compare");
                let ignore_headers = match c.ignore_headers {
                    None => Vec::new(),
                    names => header_names(ck, &format!("{cp}.ignore_headers"), names),
                };
                let mut ignore_json_fields = Vec::new();
                for (k, field) in c.ignore_json_fields.unwrap_or_default().iter().enumerate() {
                    let parts: Vec<String> = field.split('.').map(String::from).collect();
                    if parts.iter().any(|p| p.is_empty()) {
                        ck.err(
                            &format!("{cp}.ignore_json_fields[{k}]"),
                            format!("{field:?} is not a dotted path such as meta.generated_at"),
                        );
                    }
                    ignore_json_fields.push(parts);
                }
                let max_body = c.max_body.map_or(DEFAULT_COMPARE_MAX_BODY, |s| s.0);
                if max_body == 0 {
                    ck.err(&format!("{cp}.max_body"), "must be at least 1");
                }
                CompareConfig {
                    ignore_headers,
                    ignore_json_fields,
                    max_body,
                    keep: c.keep.unwrap_or(DEFAULT_COMPARE_KEEP),
                }
            });
            if let Some(upstream) = upstream {
                mirrors.push(MirrorConfig {
                    upstream,
                    percent,
                    sample_by,
                    redact_headers,
                    headers,
                    max_body_bytes: m
                        .max_body_bytes
                        .map_or(DEFAULT_MIRROR_MAX_BODY_BYTES, |s| s.0),
                    max_inflight,
                    timeout,
                    compare,
                });
            }
        }
        if !mirrors.is_empty() && matches!(kind, Some(RouteKind::Broadcast { .. })) {
            ck.err(
                &format!("{path}.mirror"),
                "mirror applies only to proxy routes (`upstream:`)",
            );
        }
        let redact_headers = header_names(ck, &format!("{path}.redact_headers"), f.redact_headers);
        let cache = f.cache.map(|c| {
            let cpath = format!("{path}.cache");
            if matches!(kind, Some(RouteKind::Broadcast { .. })) {
                ck.err(&cpath, "cache applies only to proxy routes (`upstream:`)");
            }
            for (key, d) in [
                ("ttl", c.ttl),
                ("stale_if_error", c.stale_if_error),
                ("stale_while_revalidate", c.stale_while_revalidate),
            ] {
                if let Some(d) = d {
                    positive(ck, &format!("{cpath}.{key}"), d.0);
                }
            }
            let max_object_size = c
                .max_object_size
                .map_or(DEFAULT_CACHE_MAX_OBJECT_SIZE, |s| s.0);
            if max_object_size == 0 {
                ck.err(&format!("{cpath}.max_object_size"), "must be at least 1");
            }
            RouteCacheConfig {
                ttl: c.ttl.map(|d| d.0),
                max_object_size,
                stale_if_error: c.stale_if_error.map_or(Duration::ZERO, |d| d.0),
                stale_while_revalidate: c.stale_while_revalidate.map_or(Duration::ZERO, |d| d.0),
            }
        });

        let (Some(matcher), Some(kind)) = (matcher, kind) else {
            continue;
        };
        if ck.errors.len() != before {
            continue;
        }
        // Two routes with the same host and path conflict unless their methods are disjoint.
        let key = (host.clone(), format!("{matcher:?}"));
        if let Some(&other) = seen.get(&key) {
            let prev: &RouteConfig = &out[other];
            let overlap = match (&prev.methods, &methods) {
                (Some(a), Some(b)) => a.iter().any(|m| b.contains(m)),
                _ => true,
            };
            if overlap {
                ck.err(&mpath, format!("same match as route {:?}", prev.label));
                continue;
            }
        }
        let label = f.name.unwrap_or_else(|| match &matcher {
            PathMatch::Exact(p) => format!("path:{p}"),
            PathMatch::Prefix(p) => format!("prefix:{p}"),
        });
        seen.insert(key, out.len());
        out.push(RouteConfig {
            label,
            host,
            path: matcher,
            methods,
            kind,
            strip_prefix,
            request_headers,
            response_headers,
            rate_limit,
            max_body_bytes,
            access_log,
            mirrors,
            redact_headers,
            cache,
        });
    }
    out
}

/// One `broadcast:` entry: an upstream's name, or `{ upstream, path }` with an origin-form
/// path (and query) the deliveries go to.
fn broadcast_target(
    ck: &mut Checker,
    path: &str,
    target: FileBroadcastTarget,
    lookup: &impl Fn(&mut Checker, &str, &str) -> Option<UpstreamId>,
) -> Option<BroadcastTarget> {
    let (name, to, upstream_path) = match target {
        FileBroadcastTarget::Name(name) => (name, None, path.to_string()),
        FileBroadcastTarget::Full(f) => (f.upstream, f.path, format!("{path}.upstream")),
    };
    let upstream = lookup(ck, &upstream_path, &name);
    if let Some(p) = &to {
        let origin = p.starts_with('/') && p.parse::<http::uri::PathAndQuery>().is_ok();
        if !origin {
            ck.err(
                &format!("{path}.path"),
                format!("{p:?} is not an origin-form path (`/...`, with an optional query)"),
            );
        }
    }
    Some(BroadcastTarget {
        upstream: upstream?,
        path: to,
    })
}

fn header_names(ck: &mut Checker, path: &str, names: Option<Vec<String>>) -> Vec<HeaderName> {
    match names {
        None => DEFAULT_REDACT_HEADERS
            .iter()
            .map(|n| HeaderName::from_static(n))
            .collect(),
        Some(list) => list
            .iter()
            .enumerate()
            .filter_map(|(i, n)| match HeaderName::from_bytes(n.as_bytes()) {
                Ok(h) => Some(h),
                Err(_) => {
                    ck.err(
                        &format!("{path}[{i}]"),
                        format!("invalid header name {n:?}"),
                    );
                    None
                }
            })
            .collect(),
    }
}

fn header_rules(ck: &mut Checker, path: &str, rules: Option<FileHeaderRules>) -> HeaderRules {
    let Some(rules) = rules else {
        return HeaderRules::default();
    };
    let mut out = HeaderRules::default();
    for (name, value) in rules.set {
        let key = format!("{path}.set.{name}");
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            (Ok(n), Ok(v)) => out.set.push((n, v)),
            (Err(_), _) => ck.err(&key, format!("invalid header name {name:?}")),
            (_, Err(_)) => ck.err(&key, format!("invalid header value {value:?}")),
        }
    }
    for (i, name) in rules.remove.iter().enumerate() {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(n) => out.remove.push(n),
            Err(_) => ck.err(
                &format!("{path}.remove[{i}]"),
                format!("invalid header name {name:?}"),
            ),
        }
    }
    out
}

/// Finds the line of each error's key path in block-style YAML, where it can be found.
pub(super) fn attach_lines(text: &str, errors: &mut [ConfigError]) {
    for e in errors
        .iter_mut()
        .filter(|e| e.line.is_none() && !e.path.is_empty())
    {
        e.line = locate(text, &e.path);
    }
}

fn content(l: &str) -> Option<(usize, &str)> {
    let t = l.trim_start();
    (!t.is_empty() && !t.starts_with('#')).then(|| (l.len() - t.len(), t))
}

/// Walks `a.b[2].c` down the text by indentation. A best effort: flow mappings and
/// unusual layouts stop the walk at the last line found.
fn locate(text: &str, path: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found: Option<usize> = None;
    let mut start = 0usize;
    let mut parent_indent: Option<usize> = None;
    for seg in path.split('.') {
        let (key, indices) = match seg.find('[') {
            Some(p) => (&seg[..p], &seg[p..]),
            None => (seg, ""),
        };
        let mut hit = None;
        for (i, l) in lines.iter().enumerate().skip(start) {
            let Some((indent, t)) = content(l) else {
                continue;
            };
            if parent_indent.is_some_and(|p| indent <= p) && !(i == start && t.starts_with("- ")) {
                break;
            }
            let t2 = t.strip_prefix("- ").unwrap_or(t);
            let k2 = t2.trim_start_matches(['"', '\'']);
            if k2.starts_with(key)
                && k2[key.len()..]
                    .trim_start_matches(['"', '\''])
                    .starts_with(':')
            {
                hit = Some((i, indent + (t.len() - t2.len())));
                break;
            }
        }
        let Some((line, indent)) = hit else {
            return found.map(|l| l + 1);
        };
        found = Some(line);
        start = line + 1;
        parent_indent = Some(indent);
        for idx in indices.split(['[', ']']).filter(|s| !s.is_empty()) {
            let Ok(n) = idx.parse::<usize>() else { break };
            let mut count = 0usize;
            let mut item_indent = None;
            let mut item = None;
            for (i, l) in lines.iter().enumerate().skip(start) {
                let Some((ind, t)) = content(l) else { continue };
                if parent_indent.is_some_and(|p| ind < p)
                    || (Some(ind) == parent_indent && !t.starts_with("- "))
                {
                    break;
                }
                if t.starts_with("- ") || t == "-" {
                    if item_indent.is_none() {
                        item_indent = Some(ind);
                    }
                    if Some(ind) == item_indent {
                        if count == n {
                            item = Some((i, ind));
                            break;
                        }
                        count += 1;
                    }
                }
            }
            let Some((line, ind)) = item else {
                return found.map(|l| l + 1);
            };
            found = Some(line);
            start = line;
            parent_indent = Some(ind);
        }
    }
    found.map(|l| l + 1)
}
