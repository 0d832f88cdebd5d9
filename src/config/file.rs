//! The configuration file's own shape: serde types that mirror the configuration file's YAML keys
//! one to one (`conf/fanout.yaml` shows each), and nothing more. Every struct refuses unknown keys, and values with units parse
//! into [`Size`] and [`Dur`] right here, so a mistake is reported with its key path. Turning
//! these into the validated runtime model (names resolved, addresses parsed, defaults
//! applied) is `config::model`'s job, not this file's.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::units::{parse_duration, parse_size};

/// A size in bytes, written as a number or a string with a unit (`10MiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as 1048576, 512KiB or 10MiB")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("size {v} is negative")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration, written as a string with a unit (`250ms`, `10s`, `5m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration with a unit such as 250ms, 10s or 5m")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                parse_duration(v).map(Dur).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "duration {v} needs a unit, e.g. \"{v}s\" or \"{v}ms\""
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// One `listen:` entry written out (a plain `"IP:PORT"` entry is a string).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListener {
    pub address: String,
    /// What `match.listener` calls this listener.
    pub name: Option<String>,
    pub tls: Option<FileListenerTls>,
    pub http2: Option<bool>,
    /// A PROXY protocol (v1 or v2) header comes first on every connection.
    pub proxy_protocol: Option<bool>,
}

/// `listen[].tls`: TLS termination.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListenerTls {
    pub certificates: Vec<FileCertificate>,
    pub min_version: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCertificate {
    pub cert: String,
    pub key: String,
}

/// `admin:` takes an address, or an address with a token file.
/// `routes[].broadcast[]`: an upstream's name, or `{ upstream, path }` to deliver to that
/// path (and query) instead of the request's own.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum FileBroadcastTarget {
    Name(String),
    Full(FileBroadcastTargetFull),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBroadcastTargetFull {
    pub upstream: String,
    pub path: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum FileAdmin {
    Address(String),
    Full(FileAdminFull),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAdminFull {
    pub address: String,
    pub token_file: Option<String>,
}

/// `clients:` — defences against slow, idle, oversized and too many clients.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileClients {
    pub header_timeout: Option<Dur>,
    pub body_timeout: Option<Dur>,
    pub keepalive_timeout: Option<Dur>,
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
    pub max_request_line: Option<Size>,
    pub max_header_bytes: Option<Size>,
    pub max_headers: Option<usize>,
    pub encoded_slashes: Option<EncodedSlashes>,
    /// Addresses and networks whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Option<Vec<String>>,
}

/// What to do with `%2F` or `%5C` (or a raw `\`) inside a path segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EncodedSlashes {
    /// Refuse the request with 400 (the default).
    Reject,
    /// Keep them encoded, as part of their segment.
    Keep,
    /// Decode them into `/` before normalising (Envoy's UNESCAPE_AND_FORWARD).
    Decode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessLog {
    Json,
    Off,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDefaults {
    pub max_body_bytes: Option<Size>,
    pub access_log: Option<AccessLog>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    RoundRobin,
    Weighted,
    LeastConn,
    ConsistentHash,
}

impl Balance {
    /// The name used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::Weighted => "weighted",
            Balance::LeastConn => "least_conn",
            Balance::ConsistentHash => "consistent_hash",
        }
    }
}

/// One upstream. `backends` entries are either `"host:port"` or `{address, weight}`; they
/// are kept as raw YAML here and parsed one by one so that each bad entry gets its own line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstream {
    pub balance: Option<Balance>,
    pub hash_key: Option<String>,
    pub backends: Vec<serde_yaml::Value>,
    pub health_check: Option<FileHealthCheck>,
    pub breaker: Option<FileBreaker>,
    pub timeouts: Option<FileTimeouts>,
    pub retries: Option<u32>,
    pub tls: Option<FileUpstreamTls>,
    pub protocol: Option<Protocol>,
    pub retry_budget: Option<Share>,
    pub concurrency: Option<FileConcurrency>,
    /// `pass` | `backend` | a literal host.
    pub host_header: Option<String>,
    pub sticky: Option<FileSticky>,
}

/// `upstreams.*.sticky`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSticky {
    pub cookie: Option<String>,
    pub ttl: Option<Dur>,
    pub secure: Option<bool>,
    pub http_only: Option<bool>,
}

/// `upstreams.*.concurrency`: the adaptive limit on requests in flight.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConcurrency {
    pub min: Option<u32>,
    pub max: Option<u32>,
    pub max_queue_wait: Option<Dur>,
}

/// A share: `20%`, or a fraction such as `0.2`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Share {
    Fraction(f64),
    Text(String),
}

/// `upstreams.*.tls`: TLS to the backends.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstreamTls {
    pub sni: Option<String>,
    pub verify: Option<bool>,
    pub ca_file: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
}

/// `upstreams.*.protocol`: the HTTP version spoken to the backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    H1,
    H2,
    /// h2 or HTTP/1.1 by ALPN on TLS, HTTP/1.1 on plain connections.
    Auto,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBackend {
    pub address: String,
    pub weight: Option<u32>,
    /// Shown beside the address in `/status`, the dashboard and logs.
    pub name: Option<String>,
}

/// `{ dns: NAME, port: P, interval: I, weight: W }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDnsBackend {
    pub dns: String,
    pub port: u16,
    pub interval: Option<Dur>,
    pub weight: Option<u32>,
}

/// `tracing:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTracing {
    pub otlp: String,
    pub sample: Option<f64>,
    pub service_name: Option<String>,
    pub max_queue: Option<usize>,
}

/// `resolver:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileResolver {
    pub nameservers: Vec<String>,
    pub timeout: Option<Dur>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckType {
    Http,
    Tcp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHealthCheck {
    #[serde(rename = "type")]
    pub kind: Option<HealthCheckType>,
    pub path: Option<String>,
    pub interval: Option<Dur>,
    pub timeout: Option<Dur>,
    pub healthy_after: Option<u32>,
    pub unhealthy_after: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBreaker {
    pub failures: Option<u32>,
    pub open: Option<Dur>,
    pub max_open: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTimeouts {
    pub connect: Option<Dur>,
    pub read: Option<Dur>,
    pub write: Option<Dur>,
    pub idle: Option<Dur>,
    pub tunnel: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRoute {
    pub name: Option<String>,
    #[serde(rename = "match")]
    pub matcher: FileMatch,
    pub upstream: Option<String>,
    pub broadcast: Option<Vec<FileBroadcastTarget>>,
    pub fallback: Option<Vec<String>>,
    pub fallback_max_body: Option<Size>,
    pub fallback_max_inflight: Option<usize>,
    pub strip_prefix: Option<bool>,
    pub request_headers: Option<FileHeaderRules>,
    pub response_headers: Option<FileHeaderRules>,
    pub rate_limit: Option<FileRateLimit>,
    pub max_body_bytes: Option<Size>,
    pub access_log: Option<AccessLog>,
    pub mirror: Option<Vec<FileMirror>>,
    pub redact_headers: Option<Vec<String>>,
    pub broadcast_retry: Option<FileBroadcastRetry>,
    pub cache: Option<FileRouteCache>,
    pub redirect: Option<FileRedirect>,
    pub access: Option<FileAccess>,
    pub auth: Option<FileAuth>,
    pub cors: Option<FileCors>,
    pub rewrite: Option<FileRewrite>,
    pub compress: Option<FileCompress>,
    pub plugins: Option<Vec<FilePlugin>>,
    pub split: Option<FileSplit>,
}

/// `split: { key, to: { UPSTREAM: SHARE, ... } }`; `to` keeps the file's order.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSplit {
    pub key: Option<String>,
    pub to: serde_yaml::Mapping,
}

/// A percentage: `5%`, or a plain number of percent (`5`, `0.5`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Percent {
    Number(f64),
    Text(String),
}

impl Percent {
    /// In hundredths of a percent (basis points), 0..=10,000.
    pub fn basis_points(&self) -> Result<u32, String> {
        let value = match self {
            Percent::Number(n) => *n,
            Percent::Text(t) => t
                .trim()
                .trim_end_matches('%')
                .trim()
                .parse::<f64>()
                .map_err(|_| format!("{t:?} is not a percentage such as 5% or 0.5%"))?,
        };
        if !(0.0..=100.0).contains(&value) {
            return Err(format!("{value}% is out of range 0%..=100%"));
        }
        Ok((value * 100.0).round() as u32)
    }
}

/// `plugins: [{ name, config }]`: a filter the program registered under `name`, built from
/// `config` by its own constructor.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePlugin {
    pub name: String,
    #[serde(default)]
    pub config: serde_yaml::Value,
}

/// `routes[].compress`: answers compressed for clients that accept it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCompress {
    pub algorithms: Option<Vec<String>>,
    pub min_size: Option<Size>,
    pub types: Option<Vec<String>>,
}

/// `routes[].redirect`: the gateway answers with this `Location` (a route kind).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRedirect {
    pub to: String,
    pub status: Option<u16>,
}

/// `routes[].access`: client networks allowed and denied.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAccess {
    pub allow: Option<Vec<String>>,
    pub deny: Option<Vec<String>>,
}

/// `routes[].auth`: exactly one of its keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAuth {
    pub basic: Option<FileBasicAuth>,
    pub api_key: Option<FileApiKey>,
    pub jwt: Option<FileJwt>,
    pub forward: Option<FileForwardAuth>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBasicAuth {
    pub htpasswd: String,
    pub realm: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileApiKey {
    pub header: Option<String>,
    pub query: Option<String>,
    pub keys_file: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileJwt {
    pub jwks_file: Option<String>,
    pub jwks_url: Option<String>,
    pub secret_file: Option<String>,
    /// How often a `jwks_url` is fetched again.
    pub refresh: Option<Dur>,
    pub issuer: Option<String>,
    pub audience: Option<Vec<String>>,
    pub algorithms: Option<Vec<String>>,
    pub leeway: Option<Dur>,
    pub claims_to_headers: Option<BTreeMap<String, String>>,
    /// Where the token is read from: `Authorization: Bearer` (default) or this header.
    pub header: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileForwardAuth {
    pub url: String,
    pub request_headers: Option<Vec<String>>,
    pub response_headers: Option<Vec<String>>,
    pub cache: Option<Dur>,
    pub timeout: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCors {
    pub origins: Vec<String>,
    pub methods: Option<Vec<String>>,
    pub headers: Option<Vec<String>>,
    pub expose_headers: Option<Vec<String>>,
    pub credentials: Option<bool>,
    pub max_age: Option<Dur>,
}

/// `routes[].rewrite`: the path the upstream sees, from a regex and a template.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRewrite {
    pub regex: String,
    pub to: String,
}

/// `routes[].cache`: answers of this route are cached.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRouteCache {
    pub ttl: Option<Dur>,
    pub max_object_size: Option<Size>,
    pub stale_if_error: Option<Dur>,
    pub stale_while_revalidate: Option<Dur>,
}

/// `cache:` — the shared response cache store.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCache {
    pub max_size: Option<Size>,
}

/// `redis:` — the store several instances share (`rate_limit.store: redis`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRedis {
    pub url: OneOrMany,
    pub pool: Option<usize>,
    pub timeout: Option<Dur>,
}

/// One string, or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// `rate_limit.store`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileLimitStore {
    Local,
    Redis,
}

/// `rate_limit.on_store_error`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileOnStoreError {
    Allow,
    Deny,
}

/// `routes[].broadcast_retry`: how long a broadcast delivery keeps being tried.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBroadcastRetry {
    pub max_attempts: Option<u32>,
    pub max_age: Option<Dur>,
}

/// `spool:` — where accepted broadcast requests wait until every target has them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpool {
    pub store: Option<FileSpoolStore>,
    pub dir: Option<String>,
    pub max_size: Option<Size>,
    pub fsync: Option<Fsync>,
    pub claim_after: Option<Dur>,
}

/// `state:` — durable state other than the spool.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileState {
    pub store: Option<FileSpoolStore>,
    pub dir: Option<String>,
}

/// `spool.store`, and `state.store`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileSpoolStore {
    Disk,
    Memory,
    Redis,
}

/// When the spool's writes are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fsync {
    /// One `fdatasync` for every write that arrived while the previous one ran, before
    /// the 202s of those writes go out.
    Group,
    /// One `fdatasync` per accepted request, before its 202.
    Always,
    /// Left to the kernel's write-back.
    Never,
}

/// `match:` — exactly one of `path` (exact) and `prefix`, optionally `host`, `methods`,
/// `scheme`, `listener`, `headers`, `cookies` and `query`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMatch {
    pub path: Option<String>,
    pub prefix: Option<String>,
    pub host: Option<String>,
    pub methods: Option<Vec<String>>,
    /// `http` | `https`: how the client came in.
    pub scheme: Option<String>,
    /// A `listen[].name`.
    pub listener: Option<String>,
    /// Header name → `VALUE`, `~REGEX` or `*`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Cookie name → the same.
    #[serde(default)]
    pub cookies: BTreeMap<String, String>,
    /// Query parameter → the same.
    #[serde(default)]
    pub query: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHeaderRules {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRateLimit {
    pub requests_per_second: f64,
    pub burst: Option<u32>,
    pub key: Option<String>,
    pub store: Option<FileLimitStore>,
    pub on_store_error: Option<FileOnStoreError>,
    pub lease: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMirror {
    pub upstream: String,
    pub percent: Option<f64>,
    pub sample_by: Option<String>,
    pub redact_headers: Option<Vec<String>>,
    pub headers: Option<FileHeaderRules>,
    pub max_body_bytes: Option<Size>,
    pub max_inflight: Option<usize>,
    pub timeout: Option<Dur>,
    pub compare: Option<FileCompare>,
}

/// `mirror[].compare`: compare the mirror's answers with the primary's.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCompare {
    pub ignore_headers: Option<Vec<String>>,
    pub ignore_json_fields: Option<Vec<String>>,
    pub max_body: Option<Size>,
    pub keep: Option<usize>,
}
