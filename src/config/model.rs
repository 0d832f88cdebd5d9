//! The validated runtime model: what the rest of the gateway reads. Every name is resolved
//! to an index, every address parsed, every default applied, so no request-time code ever
//! has to handle a configuration mistake.

use std::net::SocketAddr;

use ipnet::IpNet;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use pingora_core::server::configuration::ServerConf;

pub use super::file::{AccessLog, Balance, EncodedSlashes, Fsync, HealthCheckType, Protocol};
use crate::tls::ServerCert;
use pingora_core::utils::tls::{CertKey, WrappedX509};
use std::sync::Arc;

/// Index of an upstream in [`Config::upstreams`].
pub type UpstreamId = usize;
/// Index of a route in [`Config::routes`].
pub type RouteId = usize;

pub const DEFAULT_MAX_BODY_BYTES: u64 = 10 * 1024 * 1024;
pub const DEFAULT_REDACT_HEADERS: [&str; 4] = [
    "authorization",
    "x-api-key",
    "cookie",
    "proxy-authorization",
];

#[derive(Debug)]
pub struct Config {
    /// Pingora's own settings, from `server:` (threads already resolved: 0 means per core).
    pub server: ServerConf,
    pub listen: Vec<Listener>,
    pub admin: Option<AdminConfig>,
    pub clients: ClientsConfig,
    /// Legal but probably unwanted settings, one line each (`-t` and start-up print them).
    pub warnings: Vec<super::ConfigError>,
    /// `defaults.access_log`: for requests that match no route.
    pub default_access_log: AccessLog,
    pub upstreams: Vec<UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
    /// `spool:`; absent: accepted broadcast requests are kept in memory only.
    pub spool: Option<SpoolConfig>,
    /// `cache.max_size`: bytes of cached answers at most.
    pub cache_max_size: u64,
    /// `redis:`; absent: no route may use `store: redis`.
    pub redis: Option<RedisConfig>,
    /// `resolver:`; absent: the system's resolver configuration.
    pub resolver: Option<ResolverConfig>,
    /// `tracing:`; absent: no spans (the `traceparent` is still passed on).
    pub tracing: Option<TracingConfig>,
    /// `state:`; absent: in memory, for the life of the process.
    pub state: StateConfig,
}

/// Where durable state other than the spool lives (`state:`): today the key that signs
/// `sticky:` cookies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StateConfig {
    /// For the life of the process (the default).
    #[default]
    Memory,
    /// Files in this directory, kept across restarts and upgrades.
    Disk { dir: std::path::PathBuf },
}

/// `state.dir` when not given.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/fanout/state";

/// `tracing:`: OpenTelemetry spans over OTLP/HTTP.
#[derive(Debug, Clone)]
pub struct TracingConfig {
    /// `<otlp>/v1/traces`.
    pub collector: ServiceUrl,
    /// Share of new traces (no sampled parent) that are recorded.
    pub sample: f64,
    pub service_name: String,
    /// Finished spans waiting for export at most.
    pub max_queue: usize,
}

impl PartialEq for TracingConfig {
    fn eq(&self, other: &Self) -> bool {
        self.collector.url == other.collector.url
            && self.sample == other.sample
            && self.service_name == other.service_name
            && self.max_queue == other.max_queue
    }
}

impl Config {
    /// A copy of `server:` for Pingora's `Server` (which takes it by value), while the
    /// model keeps its own for comparing with a reloaded file. (`ServerConf` is not
    /// `Clone`; it is plain data, copied through its serde form.)
    pub fn server_copy(&self) -> Result<ServerConf, String> {
        serde_yaml::to_value(&self.server)
            .and_then(serde_yaml::from_value)
            .map_err(|e| format!("server: {e}"))
    }
}

/// `redis:`.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisConfig {
    pub server: RedisServer,
    /// Connections kept open (each multiplexes many requests).
    pub pool: usize,
    /// The longest a request waits for a decision from Redis.
    pub timeout: Duration,
}

/// Where Redis is: one server (`url: redis://...`), or the seed nodes of a Redis Cluster
/// (`url: [redis://..., ...]`).
#[derive(Debug, Clone, PartialEq)]
pub enum RedisServer {
    Single(String),
    Cluster(Vec<String>),
}

pub const DEFAULT_REDIS_POOL: usize = 16;
/// `sticky.cookie` when not given.
pub const DEFAULT_STICKY_COOKIE: &str = "fanout_affinity";
/// `sticky.ttl` when not given.
pub const DEFAULT_STICKY_TTL: Duration = Duration::from_secs(3600);
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(50);

pub const DEFAULT_CACHE_MAX_SIZE: u64 = 256 * 1024 * 1024;
/// The smallest `cache.max_size` allowed.
pub const MIN_CACHE_MAX_SIZE: u64 = 1024 * 1024;
/// The smallest `spool.max_size` allowed.
pub const MIN_SPOOL_MAX_SIZE: u64 = 1024 * 1024;

/// `routes[].cache`.
#[derive(Debug, Clone)]
pub struct RouteCacheConfig {
    /// Freshness for cacheable answers that state none; `None`: such answers are not stored.
    pub ttl: Option<Duration>,
    pub max_object_size: u64,
    pub stale_if_error: Duration,
    pub stale_while_revalidate: Duration,
}

/// `spool:`.
#[derive(Debug, Clone, PartialEq)]
pub struct SpoolConfig {
    /// Bytes held at most (a Redis spool: per target stream); full: 503.
    pub max_size: u64,
    pub store: SpoolStore,
}

/// `spool.store`: where accepted broadcast requests wait.
#[derive(Debug, Clone, PartialEq)]
pub enum SpoolStore {
    /// An append-only log in `dir` on this machine.
    Disk {
        dir: std::path::PathBuf,
        fsync: Fsync,
    },
    /// This process's memory: lost with it.
    Memory,
    /// Redis Streams on `redis:`, shared by every instance.
    Redis { claim_after: Duration },
}

pub const DEFAULT_CLAIM_AFTER: Duration = Duration::from_secs(30);

pub const DEFAULT_SPOOL_MAX_SIZE: u64 = 1024 * 1024 * 1024;
/// Bytes of accepted requests kept in memory when no `spool:` is configured.
pub const MEMORY_SPOOL_MAX_SIZE: u64 = 64 * 1024 * 1024;

/// `broadcast_retry:`: a delivery is given up after `max_attempts` attempts or once it
/// is older than `max_age`, whichever comes first.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub max_age: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 20,
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

/// One listening address of the proxy.
#[derive(Debug, Clone)]
pub struct Listener {
    pub addr: SocketAddr,
    /// An IPv6 socket that takes IPv6 only (`IPV6_V6ONLY`): the IPv6 half of a `:PORT`
    /// listener, whose IPv4 half is its own socket.
    pub v6_only: bool,
    /// `name:`, what `match.listener` calls it.
    pub name: Option<String>,
    pub tls: Option<ListenerTls>,
    /// TLS: offer h2 by ALPN; plain: accept h2c with prior knowledge beside HTTP/1.1.
    pub http2: bool,
    /// A PROXY protocol header (v1 or v2) comes first: the client address is taken from it.
    pub proxy_protocol: bool,
}

/// Whether a socket listening on `listening` accepted a connection whose local address is
/// `local`. An unspecified address takes its own family's connections: `:PORT` is two
/// sockets on one port, 0.0.0.0 and [::].
pub fn listener_takes(listening: &SocketAddr, local: &SocketAddr) -> bool {
    local.port() == listening.port()
        && (local.ip() == listening.ip()
            || (listening.ip().is_unspecified() && local.is_ipv4() == listening.is_ipv4()))
}

/// The `name:` of the listener that took a connection on `local`.
pub fn listener_name<'a>(listen: &'a [Listener], local: &SocketAddr) -> Option<&'a str> {
    listen
        .iter()
        .find(|l| listener_takes(&l.addr, local))
        .and_then(|l| l.name.as_deref())
}

/// `listen[].tls`, with its certificates read and checked.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    /// The first one is served when no other's names match.
    pub certificates: Vec<ServerCert>,
    /// `min_version: "1.3"`.
    pub min_tls13: bool,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub address: SocketAddr,
    /// The bearer token every admin request but `/health` and `/ready` must carry.
    pub token: Option<String>,
}

/// `clients:`, with the defaults of the README.
#[derive(Debug, Clone)]
pub struct ClientsConfig {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub max_connections: usize,
    /// 0: no per-address limit.
    pub max_connections_per_ip: usize,
    pub max_request_line: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub encoded_slashes: EncodedSlashes,
    /// Peers whose `X-Forwarded-For` is believed; the client is the right-most address
    /// of the chain not in these.
    pub trusted_proxies: Vec<IpNet>,
}

impl Default for ClientsConfig {
    fn default() -> Self {
        ClientsConfig {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(60),
            max_connections: 100_000,
            max_connections_per_ip: 0,
            max_request_line: 8 * 1024,
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            encoded_slashes: EncodedSlashes::Reject,
            trusted_proxies: Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    pub balance: Balance,
    pub hash_key: KeySource,
    /// The backends written as addresses (resolved once, at start).
    pub backends: Vec<BackendConfig>,
    /// The backends found by DNS, re-resolved on their interval.
    pub discover: Vec<DnsBackend>,
    pub health_check: Option<HealthCheckConfig>,
    pub breaker: Option<BreakerConfig>,
    pub timeouts: Timeouts,
    pub retries: u32,
    /// `retry_budget:`: retries at most this share of the requests in flight to the
    /// upstream (plus [`RETRY_FLOOR_PER_SECOND`] a second).
    pub retry_budget: Option<f64>,
    /// `concurrency:`: the adaptive limit on requests in flight.
    pub concurrency: Option<ConcurrencyConfig>,
    /// TLS to the backends (`tls:`, or every backend written `https://`).
    pub tls: Option<UpstreamTls>,
    pub protocol: Protocol,
    /// `host_header:` what `Host` the backends get.
    pub host_header: HostHeader,
    /// `sticky:`: session affinity by a signed cookie.
    pub sticky: Option<StickyConfig>,
}

/// `upstreams.*.sticky`: the first answer sets a cookie naming its backend; later requests
/// carrying it go back to that backend while it is available.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StickyConfig {
    pub cookie: String,
    pub ttl: Duration,
    /// `None`: `Secure` when the client came over TLS.
    pub secure: Option<bool>,
    pub http_only: bool,
}

/// One of a route's `plugins:`.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    pub name: String,
    /// Handed to the constructor registered under `name`.
    pub config: serde_yaml::Value,
}

/// `upstreams.*.host_header`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum HostHeader {
    /// The client's, as it came (the default).
    #[default]
    Pass,
    /// The backend's own name (or address) and its port unless the scheme's default, as
    /// nginx's `$proxy_host`.
    Backend,
    /// This one, always.
    Literal(HeaderValue),
}

impl UpstreamConfig {
    /// Whether connections to the backends are plain HTTP/1.1 (what the mirror's own
    /// pipelined lanes speak).
    pub fn plain_h1(&self) -> bool {
        self.tls.is_none() && self.protocol != Protocol::H2
    }
}

/// `upstreams.*.concurrency`: the limit on requests in flight follows the upstream's
/// latency between `min` and `max`; over it a request waits at most `max_queue_wait`.
#[derive(Debug, Clone, PartialEq)]
pub struct ConcurrencyConfig {
    pub min: u32,
    pub max: u32,
    pub max_queue_wait: Duration,
}

impl Default for ConcurrencyConfig {
    fn default() -> Self {
        ConcurrencyConfig {
            min: 4,
            max: 1000,
            max_queue_wait: Duration::from_millis(50),
        }
    }
}

#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub addr: SocketAddr,
    pub weight: u32,
    /// The host name it was written with, if any: the default SNI and verified name.
    pub host: Option<String>,
    /// `name:`, shown beside the address.
    pub name: Option<String>,
}

/// `{ dns: NAME, port: P, interval: I, weight: W }`: every A/AAAA record of NAME, on port
/// P, each with weight W, looked up again every I.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsBackend {
    pub name: String,
    pub port: u16,
    pub weight: u32,
    pub interval: Duration,
    /// `name:` of a backend written as `NAME:PORT`, shown beside it.
    pub display: Option<String>,
    /// What its addresses become.
    pub resolves_to: ResolvesTo,
}

/// What the addresses a backend's name resolves to become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvesTo {
    /// `{ dns: NAME }`: a backend each, balanced like any other (service discovery).
    EachABackend,
    /// `NAME:PORT`: one backend, its addresses tried in turn (Happy Eyeballs, RFC 8305),
    /// as a browser or the Go proxy dials a name.
    OneBackend,
}

pub const DEFAULT_DNS_INTERVAL: Duration = Duration::from_secs(10);
/// The shortest `interval` allowed: DNS is asked at most this often per name.
pub const MIN_DNS_INTERVAL: Duration = Duration::from_millis(100);

/// `resolver:`: the DNS servers asked for `dns:` backends; absent: the system's
/// (`/etc/resolv.conf`, with `/etc/hosts` first).
#[derive(Debug, Clone, PartialEq)]
pub struct ResolverConfig {
    pub nameservers: Vec<SocketAddr>,
    /// The bound on one lookup.
    pub timeout: Duration,
}

pub const DEFAULT_RESOLVER_TIMEOUT: Duration = Duration::from_secs(2);

/// `upstreams.*.tls`, with its files read and checked.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// `None`: each backend's host name (or its IP address).
    pub sni: Option<String>,
    pub verify: bool,
    /// `None`: the system's roots.
    pub ca: Option<Arc<[WrappedX509]>>,
    pub client_cert: Option<Arc<CertKey>>,
}

/// Where a per-request key comes from (consistent hashing, rate limits, mirror sampling).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    ClientIp,
    Path,
    Global,
    Header(HeaderName),
    /// The authenticated user or key (`auth`'s result), else the client address.
    Identity,
    /// One cookie's value (not the whole `Cookie` field).
    Cookie(String),
    /// One query parameter's value, as sent.
    Query(String),
    /// A fresh random key per request.
    Random,
}

impl KeySource {
    /// Parses `client_ip`, `path`, `global`, `identity`, `random`, `header:NAME`,
    /// `cookie:NAME` or `query:NAME`, accepting only `allowed` kinds.
    pub fn parse(text: &str, allowed: &[&str]) -> Result<KeySource, String> {
        let expected = || format!("expected one of {}", allowed.join(", "));
        let named = |prefix: &str| {
            let name = text.strip_prefix(prefix)?.trim();
            Some(match name.is_empty() {
                true => Err(format!(
                    "{text:?} names no {}",
                    prefix.trim_end_matches(':')
                )),
                false => Ok(name.to_string()),
            })
        };
        let key = if let Some(name) = text.strip_prefix("header:") {
            let name = HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|_| format!("invalid header name {name:?} in {text:?}"))?;
            KeySource::Header(name)
        } else if let Some(name) = named("cookie:") {
            KeySource::Cookie(name?)
        } else if let Some(name) = named("query:") {
            KeySource::Query(name?)
        } else {
            match text {
                "client_ip" => KeySource::ClientIp,
                "path" => KeySource::Path,
                "global" => KeySource::Global,
                "identity" => KeySource::Identity,
                "random" => KeySource::Random,
                _ => return Err(format!("invalid key {text:?}, {}", expected())),
            }
        };
        let kind = match key {
            KeySource::ClientIp => "client_ip",
            KeySource::Path => "path",
            KeySource::Global => "global",
            KeySource::Header(_) => "header:NAME",
            KeySource::Identity => "identity",
            KeySource::Cookie(_) => "cookie:NAME",
            KeySource::Query(_) => "query:NAME",
            KeySource::Random => "random",
        };
        if allowed.contains(&kind) {
            Ok(key)
        } else {
            Err(format!("key {text:?} is not allowed here, {}", expected()))
        }
    }
}

#[derive(Debug, Clone)]
pub struct HealthCheckConfig {
    pub kind: HealthCheckType,
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_after: u32,
    pub unhealthy_after: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    pub failures: u32,
    pub open: Duration,
    pub max_open: Duration,
    /// Only failed connects count (the passive ejection every upstream has when it sets no
    /// `breaker:`); else connect errors, timeouts and 5xx answers all do.
    pub connect_only: bool,
}

impl BreakerConfig {
    /// The passive ejection of an upstream without `breaker:`: a backend whose connects
    /// fail [`EJECT_AFTER`] times in a row is taken out for [`EJECT_FOR`], then probed by
    /// one request (doubling the period after each failed probe, up to [`EJECT_MAX`]).
    pub fn ejection() -> BreakerConfig {
        BreakerConfig {
            failures: EJECT_AFTER,
            open: EJECT_FOR,
            max_open: EJECT_MAX,
            connect_only: true,
        }
    }
}

pub const EJECT_AFTER: u32 = 3;
pub const EJECT_FOR: Duration = Duration::from_secs(10);
pub const EJECT_MAX: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
    pub write: Duration,
    pub idle: Duration,
    /// An upgraded connection (WebSocket) ends after this long with no byte either way.
    pub tunnel: Duration,
}

impl Timeouts {
    /// The longest one whole exchange may take: connect, write, then read.
    pub fn total(&self) -> Duration {
        self.connect + self.write + self.read
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            read: Duration::from_secs(60),
            write: Duration::from_secs(60),
            idle: Duration::from_secs(60),
            tunnel: Duration::from_secs(60),
        }
    }
}

/// How a client came in: `match.scheme`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    /// How a request came in: over TLS or not.
    pub fn of(https: bool) -> Scheme {
        match https {
            true => Scheme::Https,
            false => Scheme::Http,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// A route's conditions beyond host, path and method: each one listed must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Conditions {
    /// `match.scheme`.
    pub scheme: Option<Scheme>,
    /// `match.listener`: a `listen[].name`.
    pub listener: Option<String>,
    /// `match.headers`: by lower-case name.
    pub headers: Vec<(String, ValueMatch)>,
    /// `match.cookies`: by cookie name.
    pub cookies: Vec<(String, ValueMatch)>,
    /// `match.query`: by parameter name (values compared percent-decoded).
    pub query: Vec<(String, ValueMatch)>,
}

impl Conditions {
    /// How many conditions there are: more is more specific.
    pub fn count(&self) -> usize {
        usize::from(self.scheme.is_some())
            + usize::from(self.listener.is_some())
            + self.headers.len()
            + self.cookies.len()
            + self.query.len()
    }

    /// Whether any condition reads the request's fields (headers, cookies, query).
    pub fn reads_request(&self) -> bool {
        !(self.headers.is_empty() && self.cookies.is_empty() && self.query.is_empty())
    }
}

/// What a `match.headers`, `match.cookies` or `match.query` value asks of the field.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ValueMatch {
    /// `"*"`: present, with any value.
    Present,
    /// A plain value: exactly this.
    Exact(String),
    /// `"~REGEX"`: a value the expression finds a match in (anchor it with `^…$`).
    Pattern(Pattern),
}

impl ValueMatch {
    /// From a configured value: `*`, `~REGEX` or an exact value.
    pub fn parse(text: &str) -> Result<ValueMatch, String> {
        if text == "*" {
            return Ok(ValueMatch::Present);
        }
        match text.strip_prefix('~') {
            Some(source) => regex::Regex::new(source)
                .map(|regex| ValueMatch::Pattern(Pattern { regex }))
                .map_err(|e| format!("{source:?} is not a regular expression: {e}")),
            None => Ok(ValueMatch::Exact(text.to_string())),
        }
    }

    /// Whether a field's value (`None`: absent) satisfies this.
    pub fn holds(&self, value: Option<&[u8]>) -> bool {
        match (self, value) {
            (_, None) => false,
            (ValueMatch::Present, Some(_)) => true,
            (ValueMatch::Exact(want), Some(v)) => want.as_bytes() == v,
            (ValueMatch::Pattern(p), Some(v)) => {
                std::str::from_utf8(v).is_ok_and(|v| p.regex.is_match(v))
            }
        }
    }
}

/// A compiled regular expression, compared (for duplicate routes) by its text.
#[derive(Debug, Clone)]
pub struct Pattern {
    pub regex: regex::Regex,
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Pattern) -> bool {
        self.regex.as_str() == other.regex.as_str()
    }
}

impl Eq for Pattern {}

impl PartialOrd for Pattern {
    fn partial_cmp(&self, other: &Pattern) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pattern {
    fn cmp(&self, other: &Pattern) -> std::cmp::Ordering {
        self.regex.as_str().cmp(other.regex.as_str())
    }
}

impl std::hash::Hash for Pattern {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.regex.as_str().hash(state)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
}

#[derive(Debug, Clone)]
pub enum RouteKind {
    /// One backend of `upstream` answers; `fallback` upstreams race it (issue: fallback).
    Proxy {
        upstream: UpstreamId,
        fallback: Vec<UpstreamId>,
        fallback_max_body: u64,
        /// Fallback copies of this route at once; over it a request runs without them.
        fallback_max_inflight: usize,
        /// `split:`, when some requests go to other upstreams.
        split: Option<SplitConfig>,
    },
    /// Answer 202 at once and deliver to every target in the background.
    Broadcast {
        targets: Vec<BroadcastTarget>,
        retry: RetryPolicy,
    },
    /// The gateway answers with a redirect; no upstream is asked.
    Redirect(RedirectConfig),
}

/// Buckets a split divides keys into: shares are counted in hundredths of a percent.
pub const BUCKETS: u32 = 10_000;

/// `split:` on a proxy route: shares of its requests that go to other upstreams, the rest
/// to the route's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitConfig {
    /// Who stays on which side: a hash of this key picks one of 10,000 buckets.
    pub key: KeySource,
    /// The other sides in the file's order, each with its share in buckets (basis points:
    /// 500 is 5 %); their sum is at most 10,000.
    pub to: Vec<(UpstreamId, u32)>,
}

/// `redirect:`: `Location` built from `to`, whose `{scheme}`, `{host}`, `{path}` and
/// `{query}` are the request's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectConfig {
    pub to: String,
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
}

/// One target of a broadcast route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BroadcastTarget {
    pub upstream: UpstreamId,
    /// Deliveries go to this origin-form path (and query) instead of the request's own:
    /// a target given as a URL with a path (FanOut's `TARGETS`).
    pub path: Option<String>,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// The `route` label of metrics and logs: `name:` or the match written out.
    pub label: String,
    pub host: Option<String>,
    pub path: PathMatch,
    /// `None`: every method.
    pub methods: Option<Vec<Method>>,
    pub conditions: Conditions,
    pub kind: RouteKind,
    pub strip_prefix: bool,
    pub request_headers: HeaderRules,
    pub response_headers: HeaderRules,
    pub rate_limit: Option<RateLimitConfig>,
    pub max_body_bytes: u64,
    pub access_log: AccessLog,
    pub mirrors: Vec<MirrorConfig>,
    /// Headers removed from broadcast copies.
    pub redact_headers: Vec<HeaderName>,
    pub cache: Option<RouteCacheConfig>,
    /// Client networks allowed and denied.
    pub access: Option<AccessList>,
    /// The credential a request must carry.
    pub auth: Option<AuthConfig>,
    pub cors: Option<CorsConfig>,
    /// The path the upstream sees (instead of `strip_prefix`).
    pub rewrite: Option<RewriteConfig>,
    /// Answers compressed for clients that accept it.
    pub compress: Option<CompressConfig>,
    /// Filters the program registered, by name, with their `config` (checked by their
    /// constructors: `filters::plugins`).
    pub plugins: Vec<PluginConfig>,
}

#[derive(Debug, Clone, Default)]
pub struct HeaderRules {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitConfig {
    pub requests_per_second: f64,
    pub burst: u32,
    pub key: KeySource,
    /// Where the buckets live: this process, or Redis (shared by every instance).
    pub store: LimitStore,
    /// What a request gets when Redis cannot decide in time.
    pub on_store_error: OnStoreError,
    /// `store: redis`: tokens an instance takes at once and spends locally; 0: every
    /// decision asks Redis.
    pub lease: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitStore {
    Local,
    Redis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    /// Let the request through (fail open): the default.
    Allow,
    /// Refuse it with 503 (fail closed).
    Deny,
}

#[derive(Debug, Clone)]
pub struct MirrorConfig {
    pub upstream: UpstreamId,
    pub percent: f64,
    pub sample_by: Option<KeySource>,
    pub redact_headers: Vec<HeaderName>,
    pub headers: HeaderRules,
    pub max_body_bytes: u64,
    pub max_inflight: usize,
    pub timeout: Duration,
    pub compare: Option<CompareConfig>,
}

/// Lower-cases a host and drops its port, as routes store them: `API.example.com:8080` →
/// `api.example.com`, `[::1]:80` → `[::1]`.
pub fn normalize_host(host: &str) -> String {
    strip_port(host.trim()).to_ascii_lowercase()
}

/// `host` without its `:port`, if it has one (an IPv6 literal keeps its brackets).
pub fn strip_port(host: &str) -> &str {
    if let Some(i) = host.rfind(':') {
        let (name, port) = (&host[..i], &host[i + 1..]);
        let numeric = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
        if numeric && (name.ends_with(']') || !name.contains(':')) {
            return name;
        }
    }
    host
}

/// `compare:` of one mirror.
#[derive(Debug, Clone)]
pub struct CompareConfig {
    pub ignore_headers: Vec<HeaderName>,
    /// Dotted paths (`a.b`, `items.*.id`), split at the dots.
    pub ignore_json_fields: Vec<Vec<String>>,
    pub max_body: u64,
    pub keep: usize,
}

/// The slowest rate a route may set: one request a day. `-t` refuses slower ones.
pub const MIN_REQUESTS_PER_SECOND: f64 = 1.0 / 86_400.0;

// Defaults of keys a file may leave out (README, "Configuration reference").

/// `backends[].weight`.
pub const DEFAULT_WEIGHT: u32 = 1;
/// `upstreams.*.retries`.
pub const DEFAULT_RETRIES: u32 = 1;
/// `health_check.interval`, `timeout`, `healthy_after`, `unhealthy_after`.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_HEALTHY_AFTER: u32 = 2;
pub const DEFAULT_UNHEALTHY_AFTER: u32 = 2;
/// `breaker.failures`, `open`, `max_open`.
pub const DEFAULT_BREAKER_FAILURES: u32 = 5;
pub const DEFAULT_BREAKER_OPEN: Duration = Duration::from_secs(10);
pub const DEFAULT_BREAKER_MAX_OPEN: Duration = Duration::from_secs(300);
/// `routes[].fallback_max_body`, `fallback_max_inflight`.
pub const DEFAULT_FALLBACK_MAX_BODY: u64 = 1024 * 1024;
pub const DEFAULT_FALLBACK_MAX_INFLIGHT: usize = 1024;
/// `mirror[].percent`, `max_inflight`, `timeout`, `max_body_bytes`.
pub const DEFAULT_MIRROR_PERCENT: f64 = 100.0;
pub const DEFAULT_MIRROR_MAX_INFLIGHT: usize = 1024;
pub const DEFAULT_MIRROR_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_MIRROR_MAX_BODY_BYTES: u64 = 1024 * 1024;
/// `mirror[].compare.max_body`, `keep`.
pub const DEFAULT_COMPARE_MAX_BODY: u64 = 1024 * 1024;
pub const DEFAULT_COMPARE_KEEP: usize = 100;
/// `routes[].cache.max_object_size`.
pub const DEFAULT_CACHE_MAX_OBJECT_SIZE: u64 = 1024 * 1024;

// Access control (`access`, `auth`, `cors`, `rewrite`): what the route's filters are
// built from (`crate::filters`). Files named by these keys are read here, at load and at
// every reload, so a change of their content is a change of the configuration.

/// `access:`: a client address in `deny` is refused; else one in `allow` (or any, when
/// `allow` is empty) passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessList {
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
}

/// `auth:`: exactly one kind.
#[derive(Debug, Clone)]
pub enum AuthConfig {
    Basic(BasicAuthConfig),
    ApiKey(ApiKeyConfig),
    Jwt(JwtConfig),
    Forward(Box<ForwardAuthConfig>),
}

/// `auth.basic`: users and their bcrypt hashes, from an htpasswd file.
#[derive(Debug, Clone)]
pub struct BasicAuthConfig {
    pub realm: String,
    pub users: Vec<(String, String)>,
}

/// `auth.api_key`.
#[derive(Debug, Clone)]
pub struct ApiKeyConfig {
    pub from: CredentialFrom,
    pub keys: Vec<ApiKey>,
}

/// Where a credential is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialFrom {
    Header(HeaderName),
    /// A query parameter.
    Query(String),
}

/// One line of a keys file: the key, and the name it stands for (the identity).
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub key: String,
    pub name: Option<String>,
}

/// `auth.jwt`.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub keys: JwtKeys,
    pub issuer: Option<String>,
    /// Empty: `aud` is not checked.
    pub audience: Vec<String>,
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    pub leeway: Duration,
    /// Claims copied to request headers (a client's header of the same name is removed).
    pub claims_to_headers: Vec<(String, HeaderName)>,
    /// `None`: `Authorization: Bearer <token>`.
    pub header: Option<HeaderName>,
}

/// The keys tokens are checked against.
#[derive(Debug, Clone)]
pub enum JwtKeys {
    /// `jwks_file`, read at load.
    Set(jsonwebtoken::jwk::JwkSet),
    /// `jwks_url`: fetched by the gateway, again every `refresh`.
    Url {
        service: Box<ServiceUrl>,
        refresh: Duration,
    },
    /// `secret_file`: the HMAC secret (HS256/384/512 only).
    Secret(Vec<u8>),
}

/// An HTTP service the gateway itself asks (a JWKS URL, a forward-auth service): an
/// upstream of its own made from the URL, and the request target on it.
#[derive(Debug, Clone)]
pub struct ServiceUrl {
    /// As written, for logs.
    pub url: String,
    pub upstream: UpstreamConfig,
    /// Origin-form path and query.
    pub path: String,
    /// `Host` of the requests.
    pub host: String,
}

/// `auth.forward`.
#[derive(Debug, Clone)]
pub struct ForwardAuthConfig {
    pub service: ServiceUrl,
    pub request_headers: Vec<HeaderName>,
    pub response_headers: Vec<HeaderName>,
    /// Decisions reused per credential for this long; zero: never.
    pub cache: Duration,
    pub timeout: Duration,
}

pub const DEFAULT_FORWARD_AUTH_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(300);
pub const DEFAULT_JWT_LEEWAY: Duration = Duration::from_secs(30);

/// `cors:`.
#[derive(Debug, Clone)]
pub struct CorsConfig {
    /// Empty: any origin (`["*"]`).
    pub origins: Vec<String>,
    pub methods: Vec<Method>,
    pub headers: Vec<HeaderName>,
    pub expose_headers: Vec<HeaderName>,
    pub credentials: bool,
    pub max_age: Duration,
}

/// `rewrite:`: the first match of `regex` in the path is replaced by `to` (`$1`, `${name}`).
#[derive(Debug, Clone)]
pub struct RewriteConfig {
    pub regex: regex::Regex,
    pub to: String,
}

/// A content coding the gateway compresses with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Zstd,
    Br,
    Gzip,
}

impl Coding {
    pub const ALL: [Coding; 3] = [Coding::Zstd, Coding::Br, Coding::Gzip];

    /// Its name in `Accept-Encoding` and `Content-Encoding`.
    pub fn token(self) -> &'static str {
        match self {
            Coding::Zstd => "zstd",
            Coding::Br => "br",
            Coding::Gzip => "gzip",
        }
    }
}

/// `compress:`.
#[derive(Debug, Clone)]
pub struct CompressConfig {
    /// In the route's order of preference.
    pub algorithms: Vec<Coding>,
    /// Answers that declare a shorter `Content-Length` are sent as they are.
    pub min_size: u64,
    /// Media types (lower case); `text/*` stands for every `text/` type.
    pub types: Vec<String>,
}

pub const DEFAULT_COMPRESS_MIN_SIZE: u64 = 1024;
pub const DEFAULT_COMPRESS_TYPES: [&str; 9] = [
    "text/*",
    "application/json",
    "application/javascript",
    "application/xml",
    "application/*+json",
    "application/*+xml",
    "application/wasm",
    "image/svg+xml",
    "font/ttf",
];

/// Retries an upstream with a `retry_budget` may make each second whatever its load.
pub const RETRY_FLOOR_PER_SECOND: f64 = 3.0;

/// The highest `concurrency.max` accepted.
pub const MAX_CONCURRENCY: u32 = 100_000;
/// The longest `concurrency.max_queue_wait` accepted.
pub const MAX_QUEUE_WAIT: Duration = Duration::from_secs(10);

/// `tracing.sample` when not given.
pub const DEFAULT_TRACING_SAMPLE: f64 = 0.01;
/// `tracing.max_queue` when not given, and its largest value.
pub const DEFAULT_TRACING_QUEUE: usize = 8192;
pub const MAX_TRACING_QUEUE: usize = 1_000_000;
/// The longest one export of spans may take.
pub const TRACING_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
