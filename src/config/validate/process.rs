//! The sections that set up the process rather than the traffic: `server` (Pingora's
//! own keys), `admin`, `clients`, `redis`, `resolver`, `spool`.

use super::*;

/// `server:` holds Pingora's `ServerConf` keys unchanged; unknown ones are refused (Pingora
/// itself would silently ignore them). Absent values get gateway defaults.
pub(super) fn build_server(ck: &mut Checker, value: Option<Value>) -> ServerConf {
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

pub(super) fn build_admin(ck: &mut Checker, admin: FileAdmin) -> Option<AdminConfig> {
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

pub(super) fn build_clients(ck: &mut Checker, f: FileClients) -> ClientsConfig {
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
        trusted_proxies: networks(ck, "clients.trusted_proxies", f.trusted_proxies),
    }
}

/// `redis:`: every URL must be one Redis can take (`redis://` or `redis+unix://`; checked
/// by the client library, no connection is made), the pool and the timeout sane.
pub(super) fn build_redis(ck: &mut Checker, f: FileRedis) -> Option<RedisConfig> {
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

/// `resolver:`: DNS servers as `IP` (port 53) or `IP:PORT`.
pub(super) fn build_resolver(ck: &mut Checker, f: FileResolver) -> Option<ResolverConfig> {
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

/// `spool:`: `store` (disk by default, which needs `dir`), and the keys of that store.
/// With `store: disk` the directory must be one, or be creatable (its nearest existing
/// ancestor is a writable directory).
/// `state: { store, dir }`.
pub(super) fn build_state(ck: &mut Checker, f: FileState) -> StateConfig {
    match (f.store.unwrap_or(FileSpoolStore::Memory), f.dir) {
        (FileSpoolStore::Memory, None) => StateConfig::Memory,
        (FileSpoolStore::Memory, Some(_)) => {
            ck.err("state.dir", "applies only to `store: disk`");
            StateConfig::Memory
        }
        (FileSpoolStore::Disk, dir) => {
            let dir = std::path::PathBuf::from(dir.as_deref().unwrap_or(DEFAULT_STATE_DIR));
            if !dir.is_absolute() {
                ck.err(
                    "state.dir",
                    format!("{} is not an absolute path", dir.display()),
                );
            }
            StateConfig::Disk { dir }
        }
        (FileSpoolStore::Redis, _) => {
            ck.err(
                "state.store",
                "redis is not supported yet (memory or disk; a fleet's shared state is to come)",
            );
            StateConfig::Memory
        }
    }
}

pub(super) fn build_spool(ck: &mut Checker, f: FileSpool) -> Option<SpoolConfig> {
    let max_size = f.max_size.map_or(DEFAULT_SPOOL_MAX_SIZE, |s| s.0);
    if max_size < MIN_SPOOL_MAX_SIZE {
        ck.err("spool.max_size", "must be at least 1MiB");
    }
    let kind = match (f.store, &f.dir) {
        (Some(kind), _) => kind,
        (None, Some(_)) => FileSpoolStore::Disk,
        (None, None) => {
            ck.err(
                "spool",
                "give `dir` (a spool on disk) or `store: memory` or `store: redis`",
            );
            return None;
        }
    };
    if kind != FileSpoolStore::Disk {
        if f.dir.is_some() {
            ck.err("spool.dir", "applies only to `store: disk`");
        }
        if f.fsync.is_some() {
            ck.err("spool.fsync", "applies only to `store: disk`");
        }
    }
    if kind != FileSpoolStore::Redis && f.claim_after.is_some() {
        ck.err("spool.claim_after", "applies only to `store: redis`");
    }
    let store = match kind {
        FileSpoolStore::Memory => SpoolStore::Memory,
        FileSpoolStore::Redis => {
            let claim_after = f.claim_after.map_or(DEFAULT_CLAIM_AFTER, |d| d.0);
            if claim_after < Duration::from_secs(1) {
                ck.err("spool.claim_after", "must be at least 1s");
            }
            SpoolStore::Redis { claim_after }
        }
        FileSpoolStore::Disk => {
            let Some(text) = f.dir.filter(|d| !d.is_empty()) else {
                ck.err("spool.dir", "a spool on disk needs its directory");
                return None;
            };
            let dir = std::path::PathBuf::from(text);
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
            SpoolStore::Disk {
                dir,
                fsync: f.fsync.unwrap_or(Fsync::Group),
            }
        }
    };
    Some(SpoolConfig { max_size, store })
}

/// `tracing:`: the collector's OTLP/HTTP base URL (spans go to its `/v1/traces`).
pub(super) fn build_tracing(ck: &mut Checker, f: FileTracing) -> Option<TracingConfig> {
    let sample = f.sample.unwrap_or(DEFAULT_TRACING_SAMPLE);
    if !(0.0..=1.0).contains(&sample) {
        ck.err(
            "tracing.sample",
            format!("{sample} is not a share between 0 and 1"),
        );
    }
    let max_queue = f.max_queue.unwrap_or(DEFAULT_TRACING_QUEUE);
    if max_queue == 0 || max_queue > MAX_TRACING_QUEUE {
        ck.err(
            "tracing.max_queue",
            format!("{max_queue} is out of range 1..={MAX_TRACING_QUEUE}"),
        );
    }
    let url = format!("{}/v1/traces", f.otlp.trim_end_matches('/'));
    let collector = service_url(ck, "tracing.otlp", "otlp", &url, TRACING_EXPORT_TIMEOUT)?;
    Some(TracingConfig {
        collector,
        sample,
        service_name: f.service_name.unwrap_or_else(|| "fanout".to_string()),
        max_queue,
    })
}
