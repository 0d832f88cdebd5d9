use super::*;

const BASE: &str = "listen: 127.0.0.1:8080\nupstreams:\n  u: { backends: [127.0.0.1:9000] }\n";

fn ok(text: &str) -> Config {
    match from_yaml(text, "t") {
        Ok(c) => c,
        Err(e) => panic!("unexpected errors:\n{e}"),
    }
}

fn errors(text: &str) -> Vec<String> {
    match from_yaml(text, "t") {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.path, e.message))
            .collect(),
    }
}

fn has(errs: &[String], needle: &str) -> bool {
    errs.iter().any(|e| e.contains(needle))
}

#[test]
fn defaults_are_applied() {
    let c = ok(&format!(
        "{BASE}routes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n"
    ));
    let r = &c.routes[0];
    assert_eq!(r.label, "prefix:/");
    assert_eq!(r.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
    assert_eq!(r.access_log, AccessLog::Json);
    let u = &c.upstreams[0];
    assert_eq!(u.balance, Balance::RoundRobin);
    assert_eq!(u.retries, 1);
    assert!(
        c.server.threads >= 1,
        "threads 0 resolves to the core count"
    );
    assert_eq!(c.server.grace_period_seconds, Some(10));
}

#[test]
fn server_keys_pass_through_and_unknown_ones_fail() {
    let c = ok(&format!(
        "server: {{ threads: 3, upstream_keepalive_pool_size: 64, work_stealing: false }}\n{BASE}routes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n"
    ));
    assert_eq!(c.server.threads, 3);
    assert_eq!(c.server.upstream_keepalive_pool_size, 64);
    assert!(!c.server.work_stealing);
    let e = errors(&format!(
        "server: {{ thread: 3 }}\n{BASE}routes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n"
    ));
    assert!(
        has(&e, "server.thread: unknown Pingora server setting"),
        "{e:?}"
    );
}

#[test]
fn route_rules_are_checked() {
    let e = errors(&format!(
        "{BASE}routes:\n\
         \x20 - {{ match: {{ path: /a, prefix: /b }}, upstream: u }}\n\
         \x20 - {{ match: {{ path: nope }}, upstream: u }}\n\
         \x20 - {{ match: {{ path: /c }}, upstream: u, strip_prefix: true }}\n\
         \x20 - {{ match: {{ prefix: /d, methods: [G E T] }}, upstream: u }}\n\
         \x20 - {{ match: {{ prefix: /e }}, upstream: u, broadcast: [u] }}\n\
         \x20 - {{ match: {{ prefix: /f }}, upstream: u, mirror: [{{ upstream: u, percent: 120 }}] }}\n\
         \x20 - {{ match: {{ prefix: /g }}, upstream: u, rate_limit: {{ requests_per_second: 0 }} }}\n\
         \x20 - {{ match: {{ prefix: /h }}, upstream: u, request_headers: {{ set: {{ \"bad name\": x }} }} }}\n\
         \x20 - {{ match: {{ prefix: /i }}, upstream: u, rate_limit: {{ requests_per_second: 1e-9 }} }}\n"
    ));
    for needle in [
        "routes[0].match: needs exactly one of `path` (exact) and `prefix`",
        "routes[1].match: path \"nope\" must start with /",
        "routes[2].strip_prefix: strip_prefix needs a `prefix` match",
        "routes[3].match.methods[0]: invalid method",
        "routes[4]: needs exactly one of `upstream` (proxy), `broadcast` and `redirect`",
        "routes[5].mirror[0].percent: percent 120 is out of range",
        "routes[6].rate_limit.requests_per_second: must be a finite number of at least",
        "routes[7].request_headers.set.bad name: invalid header name",
        "routes[8].rate_limit.requests_per_second: must be a finite number of at least",
    ] {
        assert!(has(&e, needle), "missing {needle:?} in {e:#?}");
    }
}

#[test]
fn duplicate_routes_conflict_unless_methods_are_disjoint() {
    let e = errors(&format!(
        "{BASE}routes:\n  - {{ match: {{ prefix: /a }}, upstream: u }}\n  - {{ match: {{ prefix: /a, methods: [GET] }}, upstream: u }}\n"
    ));
    assert!(
        has(&e, "routes[1].match: same match as route \"prefix:/a\""),
        "{e:?}"
    );
    ok(&format!(
        "{BASE}routes:\n  - {{ match: {{ prefix: /a, methods: [POST] }}, upstream: u }}\n  - {{ match: {{ prefix: /a, methods: [GET] }}, upstream: u }}\n  - {{ match: {{ prefix: /a, host: x.example }}, upstream: u }}\n"
    ));
}

#[test]
fn upstream_rules_are_checked() {
    let e = errors(
        "listen: 127.0.0.1:1\nupstreams:\n  a: { backends: [] }\n  b: { hash_key: path, backends: [127.0.0.1:1, 127.0.0.1:1] }\n  \
         c: { backends: [127.0.0.1:2], breaker: { open: 10s, max_open: 1s }, health_check: { healthy_after: 0 }, retries: 99 }\n\
         routes:\n  - { match: { prefix: / }, upstream: a }\n",
    );
    for needle in [
        "upstreams.a.backends: at least one backend is required",
        "upstreams.b.hash_key: hash_key applies only to balance: consistent_hash",
        "upstreams.b.backends[1]: duplicate backend 127.0.0.1:1",
        "upstreams.c.breaker.max_open: max_open must not be shorter than open",
        "upstreams.c.health_check.healthy_after: must be at least 1",
        "upstreams.c.retries: retries 99 is out of range",
    ] {
        assert!(has(&e, needle), "missing {needle:?} in {e:#?}");
    }
}

#[test]
fn keys_parse_by_place() {
    assert_eq!(
        KeySource::parse("header:X-User", &["header:NAME"]),
        Ok(KeySource::Header(http::HeaderName::from_static("x-user")))
    );
    assert!(KeySource::parse("path", &["client_ip", "global"]).is_err());
    assert!(KeySource::parse("header:bad name", &["header:NAME"]).is_err());
}

#[test]
fn missing_sections_are_reported() {
    let e = errors("upstreams: {}\n");
    assert!(has(&e, "listen: at least one listen address is required"));
    assert!(has(&e, "routes: at least one route is required"));
}

#[test]
fn clients_and_admin_are_checked() {
    let e = errors(&format!(
        "{BASE}routes: [{{ match: {{ prefix: / }}, upstream: u }}]\n\
         clients: {{ header_timeout: 0s, max_connections: 0, max_headers: 300, \
         max_request_line: 10, encoded_slashes: maybe, idle: 5s }}\n\
         admin: {{ address: 127.0.0.1:9, token_file: /nonexistent/token }}\n"
    ));
    for needle in [
        "clients.header_timeout: must be longer than zero",
        "clients.max_connections: must be at least 1",
        "clients.max_headers: must be at most 256",
        "clients.max_request_line: must be between 64 bytes and 1MiB",
        "clients.encoded_slashes: `maybe` is not one of reject, keep, decode",
        "clients.idle: unknown key `idle`",
        "admin.token_file: cannot read /nonexistent/token",
    ] {
        assert!(has(&e, needle), "missing {needle:?} in {e:#?}");
    }
}

#[test]
fn an_open_admin_listener_without_a_token_is_warned_about() {
    let dir = std::env::temp_dir().join(format!("fanout-admin-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let routes = "routes: [{ match: { prefix: / }, upstream: u }]\n";
    let open = ok(&format!("{BASE}{routes}admin: 0.0.0.0:9091\n"));
    assert_eq!(open.warnings.len(), 1, "{:?}", open.warnings);
    assert!(open.warnings[0].message.contains("no token_file"));
    let local = ok(&format!("{BASE}{routes}admin: 127.0.0.1:9091\n"));
    assert!(local.warnings.is_empty());
    let guarded = ok(&format!(
        "{BASE}{routes}admin: {{ address: 0.0.0.0:9091, token_file: {} }}\n",
        token.display()
    ));
    assert!(guarded.warnings.is_empty());
    assert_eq!(guarded.admin.unwrap().token.as_deref(), Some("s3cret"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn spool_and_broadcast_retry_are_checked() {
    let bcast = "routes:\n  - { match: { prefix: /e }, broadcast: [u] }\n";
    let memory = ok(&format!("{BASE}{bcast}"));
    assert!(memory.spool.is_none());
    assert_eq!(memory.warnings.len(), 1);
    assert!(memory.warnings[0].message.contains("in memory only"));
    let RouteKind::Broadcast { retry, .. } = &memory.routes[0].kind else {
        panic!("a broadcast route");
    };
    assert_eq!((retry.max_attempts, retry.max_age.as_secs()), (20, 86_400));

    let dir = std::env::temp_dir().join(format!("fanout-spool-conf-{}", std::process::id()));
    let c = ok(&format!(
        "{BASE}spool: {{ dir: {}/a/b, max_size: 2MiB, fsync: always }}\n\
         routes:\n  - {{ match: {{ prefix: /e }}, broadcast: [u], broadcast_retry: {{ max_attempts: 3, max_age: 1m }} }}\n",
        dir.display()
    ));
    assert!(c.warnings.is_empty());
    let s = c.spool.as_ref().expect("a spool");
    assert_eq!(s.max_size, 2 * 1024 * 1024);
    assert!(matches!(
        s.store,
        SpoolStore::Disk {
            fsync: Fsync::Always,
            ..
        }
    ));
    let RouteKind::Broadcast { retry, .. } = &c.routes[0].kind else {
        panic!("a broadcast route");
    };
    assert_eq!((retry.max_attempts, retry.max_age.as_secs()), (3, 60));

    let file = std::env::temp_dir().join(format!("fanout-spool-file-{}", std::process::id()));
    std::fs::write(&file, b"").unwrap();
    let e = errors(&format!(
        "{BASE}spool: {{ dir: {}, max_size: 10, fsync: sometimes }}\n\
         routes:\n  - {{ match: {{ prefix: /e }}, broadcast: [u], broadcast_retry: {{ max_attempts: 0 }} }}\n\
         \x20 - {{ match: {{ prefix: /p }}, upstream: u, broadcast_retry: {{ max_attempts: 2 }} }}\n",
        file.display()
    ));
    assert!(has(&e, "spool.fsync: `sometimes` is not one of"), "{e:?}");
    let e = errors(&format!(
        "{BASE}spool: {{ dir: {}/sub, max_size: 10 }}\n\
         routes:\n  - {{ match: {{ prefix: /e }}, broadcast: [u], broadcast_retry: {{ max_attempts: 0 }} }}\n\
         \x20 - {{ match: {{ prefix: /p }}, upstream: u, broadcast_retry: {{ max_attempts: 2 }} }}\n",
        file.display()
    ));
    assert!(
        has(&e, "spool.dir: ") && has(&e, "is not a directory"),
        "{e:?}"
    );
    assert!(has(&e, "spool.max_size: must be at least 1MiB"), "{e:?}");
    assert!(
        has(
            &e,
            "routes[0].broadcast_retry.max_attempts: must be at least 1"
        ),
        "{e:?}"
    );
    assert!(
        has(
            &e,
            "routes[1].broadcast_retry: applies only to broadcast routes"
        ),
        "{e:?}"
    );
    let _ = std::fs::remove_file(&file);
}

#[test]
fn redis_and_shared_limits_are_checked() {
    let shared = "rate_limit: { requests_per_second: 10, store: redis, on_store_error: deny }";
    let c = ok(&format!(
        "{BASE}redis: {{ url: redis://127.0.0.1:6379, pool: 4, timeout: 20ms }}\n\
         routes:\n  - {{ match: {{ prefix: / }}, upstream: u, {shared} }}\n"
    ));
    let redis = c.redis.as_ref().expect("redis");
    assert!(matches!(&redis.server, RedisServer::Single(u) if u == "redis://127.0.0.1:6379"));
    assert_eq!(
        (redis.pool, redis.timeout),
        (4, std::time::Duration::from_millis(20))
    );
    let limit = c.routes[0].rate_limit.as_ref().expect("limit");
    assert_eq!(limit.store, LimitStore::Redis);
    assert_eq!(limit.on_store_error, OnStoreError::Deny);

    // A list is a cluster's nodes; defaults for pool and timeout.
    let c = ok(&format!(
        "{BASE}redis: {{ url: [redis://10.0.0.1:7000, redis://10.0.0.2:7000] }}\n\
         routes:\n  - {{ match: {{ prefix: / }}, upstream: u, {shared} }}\n"
    ));
    let redis = c.redis.as_ref().expect("redis");
    assert!(matches!(&redis.server, RedisServer::Cluster(u) if u.len() == 2));
    assert_eq!(redis.pool, DEFAULT_REDIS_POOL);
    assert_eq!(redis.timeout, DEFAULT_REDIS_TIMEOUT);
    // Local is the default store, allow the default policy.
    let c = ok(&format!(
        "{BASE}routes:\n  - {{ match: {{ prefix: / }}, upstream: u, rate_limit: {{ requests_per_second: 1 }} }}\n"
    ));
    let limit = c.routes[0].rate_limit.as_ref().expect("limit");
    assert_eq!(
        (limit.store, limit.on_store_error),
        (LimitStore::Local, OnStoreError::Allow)
    );

    let e = errors(&format!(
        "{BASE}routes:\n  - {{ match: {{ prefix: / }}, upstream: u, {shared} }}\n\
         \x20 - {{ match: {{ prefix: /b }}, upstream: u, rate_limit: {{ requests_per_second: 1, store: disk }} }}\n"
    ));
    assert!(
        has(
            &e,
            "routes[0].rate_limit.store: store: redis needs a top-level `redis:`"
        ),
        "{e:?}"
    );
    assert!(
        has(&e, "routes[1].rate_limit.store: `disk` is not one of"),
        "{e:?}"
    );
    let e = errors(&format!(
        "{BASE}redis: {{ url: [], pool: 0, timeout: 0s }}\nroutes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n"
    ));
    assert!(
        has(&e, "redis.url: the list of Redis Cluster nodes is empty"),
        "{e:?}"
    );
    assert!(has(&e, "redis.pool: must be from 1 to 1024"), "{e:?}");
    assert!(has(&e, "redis.timeout: must be more than 0"), "{e:?}");
    let e = errors(&format!(
        "{BASE}redis: {{ url: http://127.0.0.1:6379 }}\nroutes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n"
    ));
    assert!(
        has(
            &e,
            "redis.url: \"http://127.0.0.1:6379\" is not a Redis URL"
        ),
        "{e:?}"
    );

    // Legal but pointless: warned.
    let c = ok(&format!(
        "{BASE}redis: {{ url: redis://127.0.0.1:6379 }}\nroutes:\n  - {{ match: {{ prefix: / }}, upstream: u, \
         rate_limit: {{ requests_per_second: 1, on_store_error: deny }} }}\n"
    ));
    let warnings: Vec<String> = c
        .warnings
        .iter()
        .map(|w| format!("{}: {}", w.path, w.message))
        .collect();
    assert!(
        has(
            &warnings,
            "redis: neither a rate_limit nor the spool uses `store: redis`"
        ),
        "{warnings:?}"
    );
    assert!(
        has(
            &warnings,
            "routes[0].rate_limit.on_store_error: applies only with `store: redis`"
        ),
        "{warnings:?}"
    );
}

#[test]
fn dns_backends_and_the_resolver_are_checked() {
    let c = ok(
        "listen: 127.0.0.1:8080\nresolver: { nameservers: [\"127.0.0.1:5353\", 10.0.0.2] }\n\
         upstreams:\n  u:\n    backends:\n      - 127.0.0.1:9000\n      \
         - { dns: API.internal., port: 8080, interval: 2s, weight: 3 }\n      \
         - { dns: other.internal, port: 81 }\n\
         routes:\n  - { match: { prefix: / }, upstream: u }\n",
    );
    let u = &c.upstreams[0];
    assert_eq!(u.backends.len(), 1);
    assert_eq!(
        u.discover,
        vec![
            DnsBackend {
                name: "api.internal".into(),
                port: 8080,
                weight: 3,
                interval: std::time::Duration::from_secs(2),
                display: None,
                resolves_to: ResolvesTo::EachABackend,
            },
            DnsBackend {
                name: "other.internal".into(),
                port: 81,
                weight: 1,
                interval: DEFAULT_DNS_INTERVAL,
                display: None,
                resolves_to: ResolvesTo::EachABackend,
            },
        ]
    );
    let r = c.resolver.expect("resolver");
    assert_eq!(
        r.nameservers,
        vec![
            "127.0.0.1:5353".parse().unwrap(),
            "10.0.0.2:53".parse().unwrap()
        ]
    );
    assert_eq!(r.timeout, DEFAULT_RESOLVER_TIMEOUT);
    // A name alone is a whole upstream; `host:PORT` is the same as `{ dns, port }`.
    let c = ok("listen: 127.0.0.1:8080\nupstreams:\n  u: { backends: [{ dns: api.internal, port: 80 }] }\n\
         \x20 v: { backends: [\"https://Api.Internal:8443\", { address: \"https://api.internal:81\", weight: 2 }] }\n\
         routes:\n  - { match: { prefix: / }, upstream: u }\n  - { match: { prefix: /v }, upstream: v }\n");
    let v = &c.upstreams[1];
    assert!(v.backends.is_empty() && v.tls.is_some());
    let found: Vec<(&str, u16, u32)> = v
        .discover
        .iter()
        .map(|d| (d.name.as_str(), d.port, d.weight))
        .collect();
    assert_eq!(
        found,
        vec![("api.internal", 8443, 1), ("api.internal", 81, 2)]
    );

    let e = errors(
        "listen: 127.0.0.1:8080\nresolver: { nameservers: [dns.example] }\n\
         upstreams:\n  u:\n    backends:\n      - { dns: \"bad name\", port: 0, interval: 10ms, weight: 0 }\n      \
         - { dns: a.internal, port: 80 }\n      - { dns: a.internal, port: 80 }\n      \
         - { dns: b.internal }\n\
         routes:\n  - { match: { prefix: / }, upstream: u }\n",
    );
    assert!(
        has(
            &e,
            "resolver.nameservers[0]: \"dns.example\" is not an IP address"
        ),
        "{e:?}"
    );
    assert!(
        has(
            &e,
            "upstreams.u.backends[0].dns: \"bad name\" is not a DNS name"
        ),
        "{e:?}"
    );
    assert!(
        has(&e, "upstreams.u.backends[0].port: port 0 is not a port"),
        "{e:?}"
    );
    assert!(
        has(
            &e,
            "upstreams.u.backends[0].interval: must be at least 100ms"
        ),
        "{e:?}"
    );
    assert!(
        has(
            &e,
            "upstreams.u.backends[0].weight: weight 0 is out of range"
        ),
        "{e:?}"
    );
    assert!(
        has(
            &e,
            "upstreams.u.backends[2]: duplicate backend a.internal:80"
        ),
        "{e:?}"
    );
    assert!(
        has(&e, "upstreams.u.backends[3]: `port` is required here"),
        "{e:?}"
    );
}

#[test]
fn colon_port_listens_on_every_address() {
    let c = ok("listen: [\":8080\", { address: \":8443\", http2: true }]\nupstreams:\n  u: { backends: [127.0.0.1:9000] }\nroutes:\n  - { match: { prefix: / }, upstream: u }\n");
    let v4: Vec<_> = c.listen.iter().filter(|l| l.addr.is_ipv4()).collect();
    assert_eq!(v4.len(), 2);
    assert!(v4
        .iter()
        .all(|l| l.addr.ip().is_unspecified() && !l.v6_only));
    // The IPv6 half, where the host has IPv6, takes IPv6 only and keeps the settings.
    for l in c.listen.iter().filter(|l| l.addr.is_ipv6()) {
        assert!(l.v6_only && l.addr.ip().is_unspecified());
        assert_eq!(l.http2, l.addr.port() == 8443);
    }
    let errs = errors("listen: [\":80x\"]\nupstreams:\n  u: { backends: [127.0.0.1:9000] }\nroutes:\n  - { match: { prefix: / }, upstream: u }\n");
    assert!(has(&errs, "expected IP:PORT or :PORT"), "{errs:?}");
}

#[test]
fn broadcast_targets_may_name_a_path() {
    let c = ok(&format!(
        "{BASE}  v: {{ backends: [127.0.0.1:9001] }}\nroutes:\n  - {{ match: {{ prefix: /e }}, broadcast: [u, {{ upstream: v, path: \"/hooks/x?k=1\" }}] }}\n"
    ));
    let RouteKind::Broadcast { targets, .. } = &c.routes[0].kind else {
        panic!("not a broadcast route");
    };
    assert_eq!(targets[0].path, None);
    assert_eq!(targets[1].path.as_deref(), Some("/hooks/x?k=1"));
    let errs = errors(&format!(
        "{BASE}routes:\n  - {{ match: {{ prefix: /e }}, broadcast: [{{ upstream: u, path: hooks }}, {{ upstream: w }}] }}\n"
    ));
    assert!(
        has(
            &errs,
            "routes[0].broadcast[0].path: \"hooks\" is not an origin-form path"
        ),
        "{errs:?}"
    );
    assert!(
        has(
            &errs,
            "routes[0].broadcast[1].upstream: unknown upstream \"w\""
        ),
        "{errs:?}"
    );
}

/// A file for one test, removed when dropped.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(name: &str, content: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!("fanout-{}-{name}", std::process::id()));
        std::fs::write(&path, content).unwrap();
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn access_keys_are_checked_one_line_each() {
    let htpasswd = TempFile::new(
        "htpasswd",
        "alice:$2y$05$5rNydlnQw8t8kMmMuHtHAunoeIHk4LCy4I8u/CcJjtLbkKR94xDVa\n\
         bob:$apr1$ZpZdmZTM$ZqBT9fIzqNVOqIt1eDI9m/\ncarol:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n",
    );
    let e = errors(&format!(
        "{BASE}clients: {{ trusted_proxies: [10.0.0.0/8, nonsense] }}\nroutes:\n\
         \x20 - {{ match: {{ prefix: /a }}, upstream: u, auth: {{ basic: {{ htpasswd: {} }} }} }}\n\
         \x20 - {{ match: {{ prefix: /b }}, upstream: u, cors: {{ origins: [\"*\"], credentials: true }} }}\n\
         \x20 - {{ match: {{ prefix: /c }}, upstream: u, rewrite: {{ regex: \"^/c/(\", to: /x }} }}\n\
         \x20 - {{ match: {{ prefix: /d }}, upstream: u, strip_prefix: true, rewrite: {{ regex: \"^/d\", to: / }} }}\n\
         \x20 - {{ match: {{ prefix: /e }}, upstream: u, auth: {{ jwt: {{ jwks_file: {}, algorithms: [HS256] }} }} }}\n\
         \x20 - {{ match: {{ prefix: /f }}, redirect: {{ to: \"https://x{{nope}}\", status: 200 }} }}\n\
         \x20 - {{ match: {{ prefix: /g }}, upstream: u, access: {{ allow: [10.0.0.0/33] }} }}\n\
         \x20 - {{ match: {{ prefix: /h }}, upstream: u, auth: {{ basic: {{ htpasswd: {} }}, api_key: {{ keys_file: {} }} }} }}\n\
         \x20 - {{ match: {{ prefix: /i }}, upstream: u, auth: {{ forward: {{ url: \"ftp://x/\" }} }} }}\n",
        htpasswd.path(),
        htpasswd.path(),
        htpasswd.path(),
        htpasswd.path(),
    ));
    for needle in [
        "clients.trusted_proxies[1]: \"nonsense\" is not an address",
        "user \"bob\" has a weaker or unknown hash kind; only bcrypt entries are accepted (htpasswd -B)",
        "user \"carol\" has a weaker or unknown hash kind",
        "routes[1].cors.origins: \"*\" with credentials: true",
        "routes[2].rewrite.regex: invalid regex",
        "routes[3].rewrite: a route has `rewrite` or `strip_prefix`, not both",
        "routes[4].auth.jwt.jwks_file",
        "routes[4].auth.jwt.algorithms[0]: HS256 needs a `secret_file`",
        "routes[5].redirect.status: 200 is not one of 301, 302, 303, 307, 308",
        "routes[5].redirect.to",
        "routes[6].access.allow[0]",
        "routes[7].auth: needs exactly one of `basic`, `api_key`, `jwt` and `forward`",
        "routes[8].auth.forward.url: \"ftp://x/\": expected an http:// or https:// URL",
    ] {
        assert!(has(&e, needle), "missing {needle:?} in {e:#?}");
    }
    assert!(!has(&e, "user \"alice\""), "{e:#?}");
    assert!(e.iter().all(|l| !l.contains('\n')), "{e:#?}");
}

#[test]
fn access_keys_build_the_model() {
    let keys = TempFile::new(
        "keys",
        "# keys\n0123456789abcdef-one alice\n0123456789abcdef-two\n",
    );
    let c = ok(&format!(
        "listen:\n  - {{ address: 127.0.0.1:8080, proxy_protocol: true }}\n\
         upstreams:\n  u: {{ backends: [127.0.0.1:9000] }}\n\
         clients: {{ trusted_proxies: [10.0.0.0/8, 127.0.0.1, \"::1\"] }}\nroutes:\n\
         \x20 - match: {{ prefix: /a }}\n    upstream: u\n    access: {{ allow: [10.0.0.0/8], deny: [10.66.0.0/16] }}\n\
         \x20   auth: {{ api_key: {{ query: key, keys_file: {} }} }}\n\
         \x20   rate_limit: {{ requests_per_second: 5, key: identity }}\n\
         \x20   rewrite: {{ regex: \"^/a/(.*)$\", to: \"/v1/$1\" }}\n\
         \x20   cors: {{ origins: [\"https://App.example.com/\"], credentials: true, max_age: 10m }}\n\
         \x20 - {{ match: {{ prefix: /r }}, redirect: {{ to: \"https://{{host}}{{path}}{{query}}\" }} }}\n",
        keys.path()
    ));
    assert!(c.listen[0].proxy_protocol);
    assert_eq!(c.clients.trusted_proxies.len(), 3);
    let r = &c.routes[0];
    assert_eq!(r.access.as_ref().unwrap().deny.len(), 1);
    match &r.auth {
        Some(AuthConfig::ApiKey(k)) => {
            assert_eq!(k.from, CredentialFrom::Query("key".into()));
            assert_eq!(k.keys.len(), 2);
            assert_eq!(k.keys[0].name.as_deref(), Some("alice"));
            assert_eq!(k.keys[1].name, None);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r.rate_limit.as_ref().unwrap().key, KeySource::Identity);
    assert_eq!(
        r.cors.as_ref().unwrap().origins,
        ["https://app.example.com"]
    );
    match &c.routes[1].kind {
        RouteKind::Redirect(r) => assert_eq!(r.status, 302),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_mirror_never_gets_the_routes_credential() {
    let keys = TempFile::new("mirror-keys", "0123456789abcdef-one\n");
    let c = ok(&format!(
        "{BASE}routes:\n\
         \x20 - match: {{ prefix: /a }}\n    upstream: u\n\
         \x20   auth: {{ api_key: {{ header: X-Token, keys_file: {} }} }}\n\
         \x20   mirror: [{{ upstream: u, redact_headers: [Cookie] }}]\n",
        keys.path()
    ));
    let names: Vec<&str> = c.routes[0].mirrors[0]
        .redact_headers
        .iter()
        .map(|h| h.as_str())
        .collect();
    assert_eq!(names, ["cookie", "x-token"]);
}

#[test]
fn compress_is_checked() {
    let e = errors(&format!(
        "{BASE}routes:\n\
         \x20 - {{ match: {{ prefix: /a }}, upstream: u, compress: {{ algorithms: [gzip, deflate, gzip] }} }}\n\
         \x20 - {{ match: {{ prefix: /b }}, upstream: u, compress: {{ types: [json, \"*/*\"] }} }}\n\
         \x20 - {{ match: {{ prefix: /c }}, broadcast: [u], compress: {{}} }}\n"
    ));
    for needle in [
        "routes[0].compress.algorithms[1]: \"deflate\" is not one of zstd, br, gzip",
        "routes[0].compress.algorithms[2]: \"gzip\" is listed twice",
        "routes[1].compress.types[0]: \"json\" is not a media type",
        "routes[1].compress.types[1]",
        "routes[2].compress: compress applies only to proxy routes",
    ] {
        assert!(has(&e, needle), "missing {needle:?} in {e:#?}");
    }
    let c = ok(&format!(
        "{BASE}routes:\n  - {{ match: {{ prefix: / }}, upstream: u, compress: {{}} }}\n"
    ));
    let z = c.routes[0].compress.as_ref().unwrap();
    assert_eq!(z.algorithms, Coding::ALL);
    assert_eq!(z.min_size, DEFAULT_COMPRESS_MIN_SIZE);
}

#[test]
fn retry_budgets_are_shares() {
    let c = ok(
        "listen: 127.0.0.1:8080\nupstreams:\n  u: { backends: [127.0.0.1:9000], retry_budget: 20% }\n  v: { backends: [127.0.0.1:9001], retry_budget: 0.5 }\nroutes:\n  - { match: { prefix: / }, upstream: u }\n"
    );
    assert_eq!(c.upstreams[0].retry_budget, Some(0.2));
    assert_eq!(c.upstreams[1].retry_budget, Some(0.5));
    let e = errors("listen: 127.0.0.1:8080\nupstreams:\n  u: { backends: [127.0.0.1:9000], retry_budget: 120% }\n  v: { backends: [127.0.0.1:9001], retry_budget: lots }\n");
    assert!(has(&e, "upstreams.u.retry_budget"), "{e:#?}");
    assert!(has(&e, "upstreams.v.retry_budget"), "{e:#?}");
}

#[test]
fn concurrency_limits_have_defaults_and_bounds() {
    let c = ok(
        "listen: 127.0.0.1:8080\nupstreams:\n  u: { backends: [127.0.0.1:9000], concurrency: {} }\n  v: { backends: [127.0.0.1:9001], concurrency: { min: 8, max: 64, max_queue_wait: 20ms } }\nroutes:\n  - { match: { prefix: / }, upstream: u }\n"
    );
    assert_eq!(
        c.upstreams[0].concurrency,
        Some(ConcurrencyConfig::default())
    );
    let v = c.upstreams[1].concurrency.as_ref().unwrap();
    assert_eq!((v.min, v.max), (8, 64));
    assert_eq!(v.max_queue_wait, std::time::Duration::from_millis(20));
    assert!(c.upstreams[2..].is_empty());
    let e = errors("listen: 127.0.0.1:8080\nupstreams:\n  u: { backends: [127.0.0.1:9000], concurrency: { min: 10, max: 5 } }\n  v: { backends: [127.0.0.1:9001], concurrency: { min: 0, max_queue_wait: 1m, limit: 3 } }\n  w: { backends: [127.0.0.1:9002], concurrency: { min: 1, max: 200000, max_queue_wait: 1m } }\n");
    assert!(has(&e, "upstreams.u.concurrency.max"), "{e:#?}");
    assert!(has(&e, "upstreams.v.concurrency"), "{e:#?}");
    assert!(has(&e, "upstreams.w.concurrency.max"), "{e:#?}");
    assert!(has(&e, "upstreams.w.concurrency.max_queue_wait"), "{e:#?}");
}

#[test]
fn tracing_names_the_collector_and_bounds_its_queue() {
    let c = ok(
        "listen: 127.0.0.1:8080\ntracing: { otlp: \"http://127.0.0.1:4318/\" }\nupstreams:\n  u: { backends: [127.0.0.1:9000] }\nroutes:\n  - { match: { prefix: / }, upstream: u }\n"
    );
    let t = c.tracing.as_ref().unwrap();
    assert_eq!(t.collector.url, "http://127.0.0.1:4318/v1/traces");
    assert_eq!(t.collector.path, "/v1/traces");
    assert_eq!((t.sample, t.max_queue), (0.01, 8192));
    assert_eq!(t.service_name, "fanout");
    let e = errors("listen: 127.0.0.1:8080\ntracing: { otlp: \"ftp://x\", sample: 2, max_queue: 0, batch: 5 }\n");
    assert!(has(&e, "tracing"), "{e:#?}");
    let e =
        errors("listen: 127.0.0.1:8080\ntracing: { otlp: \"ftp://x\", sample: 2, max_queue: 0 }\n");
    assert!(has(&e, "tracing.otlp"), "{e:#?}");
    assert!(has(&e, "tracing.sample"), "{e:#?}");
    assert!(has(&e, "tracing.max_queue"), "{e:#?}");
}

#[test]
fn a_spool_in_redis_and_leased_limits_are_checked() {
    let redis = "redis: { url: redis://127.0.0.1:6379 }";
    let leased = "rate_limit: { requests_per_second: 1000, burst: 200, store: redis, lease: 100 }";
    let c = ok(&format!(
        "{BASE}{redis}\nspool: {{ store: redis, claim_after: 10s, max_size: 8MiB }}\n\
         routes:\n  - {{ match: {{ prefix: /e }}, broadcast: [u] }}\n\
         \x20 - {{ match: {{ prefix: / }}, upstream: u, {leased} }}\n"
    ));
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let s = c.spool.as_ref().expect("a spool");
    assert_eq!(s.max_size, 8 * 1024 * 1024);
    assert!(
        matches!(s.store, SpoolStore::Redis { claim_after } if claim_after.as_secs() == 10),
        "{s:?}"
    );
    assert_eq!(c.routes[1].rate_limit.as_ref().map(|l| l.lease), Some(100));
    // The spool alone is a use of `redis:`; claim_after has a default.
    let c = ok(&format!(
        "{BASE}{redis}\nspool: {{ store: redis }}\nroutes:\n  - {{ match: {{ prefix: /e }}, broadcast: [u] }}\n"
    ));
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    assert!(matches!(
        c.spool.as_ref().map(|s| &s.store),
        Some(SpoolStore::Redis { claim_after }) if *claim_after == DEFAULT_CLAIM_AFTER
    ));
    // In memory, bounded by max_size, and warned about.
    let c = ok(&format!(
        "{BASE}spool: {{ store: memory, max_size: 2MiB }}\nroutes:\n  - {{ match: {{ prefix: /e }}, broadcast: [u] }}\n"
    ));
    assert!(c.warnings[0].message.contains("in memory only"));

    let e = errors(&format!(
        "{BASE}spool: {{ store: redis, dir: /tmp/x, fsync: always, claim_after: 10ms }}\n\
         routes:\n  - {{ match: {{ prefix: /e }}, broadcast: [u] }}\n\
         \x20 - {{ match: {{ prefix: / }}, upstream: u, rate_limit: {{ requests_per_second: 10, lease: 5 }} }}\n"
    ));
    for line in [
        "spool.dir: applies only to `store: disk`",
        "spool.fsync: applies only to `store: disk`",
        "spool.claim_after: must be at least 1s",
        "spool.store: store: redis needs a top-level `redis:`",
        "routes[1].rate_limit.lease: applies only with `store: redis`",
    ] {
        assert!(has(&e, line), "{line}: {e:?}");
    }
    let e = errors(&format!(
        "{BASE}spool: {{ max_size: 2MiB, claim_after: 1m }}\nroutes:\n  - {{ match: {{ prefix: /e }}, broadcast: [u] }}\n"
    ));
    assert!(has(&e, "spool: give `dir`"), "{e:?}");
    let e = errors(&format!(
        "{BASE}spool: {{ store: memory, claim_after: 1m }}\nroutes:\n  - {{ match: {{ prefix: /e }}, broadcast: [u] }}\n"
    ));
    assert!(
        has(&e, "spool.claim_after: applies only to `store: redis`"),
        "{e:?}"
    );
    // A lease larger than the bucket is said to be capped.
    let c = ok(&format!(
        "{BASE}{redis}\nroutes:\n  - {{ match: {{ prefix: / }}, upstream: u, rate_limit: {{ requests_per_second: 10, burst: 4, store: redis, lease: 50 }} }}\n"
    ));
    assert!(
        c.warnings[0]
            .message
            .contains("at most the bucket's burst + 1 = 5"),
        "{:?}",
        c.warnings
    );
}

#[test]
fn messages_are_in_words_with_the_nearest_name() {
    let e = errors(&format!(
        "{BASE}upstreams2: {{}}\nroutes:\n  - {{ match: {{ prefix: / }}, upstream: uu }}\n  \
         - {{ match: {{ prefix: /a }}, upstream: u, max_body_bytes: [1] }}\n"
    ));
    assert!(
        has(&e, "upstreams2: unknown key; did you mean `upstreams`?"),
        "{e:?}"
    );
    assert!(
        has(
            &e,
            "routes[0].upstream: unknown upstream \"uu\"; did you mean \"u\"?"
        ),
        "{e:?}"
    );
    let e = errors(&format!(
        "{BASE}routes:\n  - {{ match: {{ prefix: / }}, upstream: u, rate_limit: {{ requests_per_second: 5, burst: many }} }}\n"
    ));
    assert!(
        has(
            &e,
            "routes[0].rate_limit.burst: expected a whole number (0 or more), found \"many\""
        ),
        "{e:?}"
    );
    let e = errors("listen: 127.0.0.1:8080\nupstreams:\n\tu: { backends: [127.0.0.1:9000] }\n");
    assert!(
        has(&e, "a tab character: YAML indents with spaces, never tabs"),
        "{e:?}"
    );
}
