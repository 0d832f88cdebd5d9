//! `routes:`: matches, kinds (proxy, fallback, broadcast), header rules, limits, mirrors
//! and their comparisons, caching; every reference to an upstream checked.

use super::*;

pub(super) fn build_routes(
    ck: &mut Checker,
    items: Vec<Value>,
    listen: &[Listener],
    upstreams: &[(String, Option<UpstreamConfig>)],
    defaults: &FileDefaults,
) -> Vec<RouteConfig> {
    let lookup = |ck: &mut Checker, path: &str, name: &str| -> Option<UpstreamId> {
        let found = upstreams.iter().position(|(n, _)| n == name);
        if found.is_none() {
            let names = upstreams.iter().map(|(n, _)| n.as_str());
            ck.err(
                path,
                match super::words::nearest(name, names) {
                    Some(near) => format!("unknown upstream {name:?}; did you mean {near:?}?"),
                    None => format!("unknown upstream {name:?}"),
                },
            );
        }
        found
    };
    let mut out: Vec<RouteConfig> = Vec::new();
    // A `~REGEX` condition's order and equality are its text's, which never changes (the
    // compiled expression's inner cache is what the lint sees).
    #[allow(clippy::mutable_key_type)]
    let mut seen: BTreeMap<(Option<String>, String, Conditions), usize> = BTreeMap::new();
    for (i, value) in items.into_iter().enumerate() {
        let path = format!("routes[{i}]");
        let Some(f) = ck.parse::<FileRoute>(&path, value) else {
            continue;
        };
        let before = ck.errors.len();
        let mpath = format!("{path}.match");
        let conditions = build_conditions(ck, &mpath, &f.matcher, listen);
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
        let kind = match (f.upstream, f.broadcast, f.redirect) {
            (Some(name), None, None) => {
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
                let split = f.split.as_ref().and_then(|sp| {
                    build_split(ck, &format!("{path}.split"), sp, upstream, &lookup)
                });
                upstream.map(|upstream| RouteKind::Proxy {
                    upstream,
                    split,
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
            (None, Some(targets), None) => {
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
            (None, None, Some(r)) => {
                if f.fallback.is_some() {
                    ck.err(
                        &format!("{path}.fallback"),
                        "fallback applies only to proxy routes (`upstream:`)",
                    );
                }
                build_redirect(ck, &format!("{path}.redirect"), r).map(RouteKind::Redirect)
            }
            _ => {
                ck.err(
                    &path,
                    "needs exactly one of `upstream` (proxy), `broadcast` and `redirect`",
                );
                None
            }
        };
        let strip_prefix = f.strip_prefix.unwrap_or(false);
        let rewrite = f
            .rewrite
            .and_then(|r| build_rewrite(ck, &format!("{path}.rewrite"), r));
        let mut plugins: Vec<PluginConfig> = Vec::new();
        for (i, p) in f.plugins.unwrap_or_default().into_iter().enumerate() {
            if p.name.trim().is_empty() {
                ck.err(&format!("{path}.plugins[{i}].name"), "must not be empty");
            } else {
                plugins.push(PluginConfig {
                    name: p.name,
                    config: p.config,
                });
            }
        }
        if rewrite.is_some() && !matches!(kind, Some(RouteKind::Proxy { .. }) | None) {
            ck.err(
                &format!("{path}.rewrite"),
                "rewrite applies only to proxy routes (`upstream:`)",
            );
        }
        if strip_prefix && rewrite.is_some() {
            ck.err(
                &format!("{path}.rewrite"),
                "a route has `rewrite` or `strip_prefix`, not both",
            );
        }
        let access = f
            .access
            .map(|a| build_access(ck, &format!("{path}.access"), a));
        let label = f.name.clone().unwrap_or_else(|| match &matcher {
            Some(PathMatch::Exact(p)) => format!("path:{p}"),
            Some(PathMatch::Prefix(p)) => format!("prefix:{p}"),
            None => path.clone(),
        });
        let auth = f
            .auth
            .and_then(|a| build_auth(ck, &format!("{path}.auth"), &label, a));
        let cors = f.cors.map(|c| build_cors(ck, &format!("{path}.cors"), c));
        let compress = f
            .compress
            .map(|c| build_compress(ck, &format!("{path}.compress"), c));
        if compress.is_some() && !matches!(kind, Some(RouteKind::Proxy { .. }) | None) {
            ck.err(
                &format!("{path}.compress"),
                "compress applies only to proxy routes (`upstream:`)",
            );
        }
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
            let key =
                match r.key.as_deref().map(|k| {
                    KeySource::parse(k, &["client_ip", "global", "header:NAME", "identity"])
                }) {
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
            let lease = r.lease.unwrap_or(0);
            if lease > 0 && !matches!(r.store, Some(FileLimitStore::Redis)) {
                ck.err(
                    &format!("{rpath}.lease"),
                    "applies only with `store: redis` (a local limit has no round trip to save)",
                );
            } else if lease > 1_000_000 {
                ck.err(&format!("{rpath}.lease"), "must be at most 1000000 tokens");
            } else if lease > burst.saturating_add(1) {
                ck.warn(
                    &format!("{rpath}.lease"),
                    format!(
                        "a lease holds at most the bucket's burst + 1 = {} tokens",
                        burst.saturating_add(1)
                    ),
                );
            }
            RateLimitConfig {
                requests_per_second: r.requests_per_second,
                burst,
                key,
                lease,
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
        // A mirror never gets the route's credential, whatever its `redact_headers` say.
        let credentials: Vec<HeaderName> = match &auth {
            None => Vec::new(),
            Some(AuthConfig::Basic(_)) => vec![http::header::AUTHORIZATION],
            Some(AuthConfig::Jwt(j)) => {
                vec![j.header.clone().unwrap_or(http::header::AUTHORIZATION)]
            }
            Some(AuthConfig::ApiKey(k)) => match &k.from {
                CredentialFrom::Header(h) => vec![h.clone()],
                CredentialFrom::Query(_) => Vec::new(),
            },
            Some(AuthConfig::Forward(f)) => f.request_headers.clone(),
        };
        for m in &mut mirrors {
            for h in &credentials {
                if !m.redact_headers.contains(h) {
                    m.redact_headers.push(h.clone());
                }
            }
        }
        if rate_limit
            .as_ref()
            .is_some_and(|r| r.key == KeySource::Identity)
            && auth.is_none()
        {
            ck.warn(
                &format!("{path}.rate_limit.key"),
                "identity without `auth`: every request is keyed by its client address",
            );
        }
        if !mirrors.is_empty() && !matches!(kind, Some(RouteKind::Proxy { .. }) | None) {
            ck.err(
                &format!("{path}.mirror"),
                "mirror applies only to proxy routes (`upstream:`)",
            );
        }
        let redact_headers = header_names(ck, &format!("{path}.redact_headers"), f.redact_headers);
        let cache = f.cache.map(|c| {
            let cpath = format!("{path}.cache");
            if !matches!(kind, Some(RouteKind::Proxy { .. }) | None) {
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
        if let RouteKind::Redirect(r) = &kind {
            let schemes = reachable_schemes(&conditions, listen);
            if let Some(url) = redirect_loop(&r.to, host.as_deref(), &matcher, &schemes) {
                ck.err(
                    &format!("{path}.redirect.to"),
                    format!(
                        "redirects {url} to itself, a loop: add `scheme: http` (or a `listener:`) \
                         to the match, or send it elsewhere"
                    ),
                );
                continue;
            }
        }
        // Two routes with the same host, path and conditions conflict unless their methods
        // are disjoint.
        let key = (host.clone(), format!("{matcher:?}"), conditions.clone());
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
        seen.insert(key, out.len());
        out.push(RouteConfig {
            label,
            host,
            path: matcher,
            methods,
            conditions,
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
            access,
            auth,
            cors,
            rewrite,
            compress,
            plugins,
        });
    }
    out
}

/// One `broadcast:` entry: an upstream's name, or `{ upstream, path }` with an origin-form
/// path (and query) the deliveries go to.
pub(super) fn broadcast_target(
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

pub(super) fn header_names(
    ck: &mut Checker,
    path: &str,
    names: Option<Vec<String>>,
) -> Vec<HeaderName> {
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

pub(super) fn header_rules(
    ck: &mut Checker,
    path: &str,
    rules: Option<FileHeaderRules>,
) -> HeaderRules {
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

/// `split:` of a proxy route whose own upstream is `own`.
fn build_split(
    ck: &mut Checker,
    at: &str,
    f: &FileSplit,
    own: Option<UpstreamId>,
    lookup: &dyn Fn(&mut Checker, &str, &str) -> Option<UpstreamId>,
) -> Option<SplitConfig> {
    let before = ck.errors.len();
    let key = match &f.key {
        None => KeySource::ClientIp,
        Some(k) => KeySource::parse(k, &["client_ip", "header:NAME", "cookie:NAME", "random"])
            .unwrap_or_else(|e| {
                ck.err(&format!("{at}.key"), e);
                KeySource::ClientIp
            }),
    };
    if f.to.is_empty() {
        ck.err(&format!("{at}.to"), "names no upstream".to_string());
    }
    let mut to: Vec<(UpstreamId, u32)> = Vec::new();
    for (name, share) in &f.to {
        let Some(name) = name.as_str() else {
            ck.err(
                &format!("{at}.to"),
                format!("{name:?} is not an upstream name"),
            );
            continue;
        };
        let here = format!("{at}.to.{name}");
        let share = serde_yaml::from_value::<Percent>(share.clone())
            .map_err(|_| format!("{share:?} is not a percentage such as 5%"))
            .and_then(|p| p.basis_points());
        let share = match share {
            Ok(s) => s,
            Err(e) => {
                ck.err(&here, e);
                continue;
            }
        };
        let Some(u) = lookup(ck, &here, name) else {
            continue;
        };
        if Some(u) == own {
            ck.err(
                &here,
                "is the route's own upstream: it gets what the split leaves".to_string(),
            );
        } else if to.iter().any(|(t, _)| *t == u) {
            ck.err(&here, "is named twice".to_string());
        } else {
            to.push((u, share));
        }
    }
    let total: u32 = to.iter().map(|(_, s)| s).sum();
    if total > BUCKETS {
        ck.err(
            &format!("{at}.to"),
            format!(
                "the shares add up to {}%, over 100%",
                f64::from(total) / 100.0
            ),
        );
    }
    (ck.errors.len() == before).then_some(SplitConfig { key, to })
}

/// `match.scheme`, `match.listener`, `match.headers`, `match.cookies`, `match.query`.
fn build_conditions(
    ck: &mut Checker,
    mpath: &str,
    m: &FileMatch,
    listen: &[Listener],
) -> Conditions {
    let scheme = m.scheme.as_deref().and_then(|s| match s {
        "http" => Some(Scheme::Http),
        "https" => Some(Scheme::Https),
        other => {
            ck.err(
                &format!("{mpath}.scheme"),
                format!("{other:?} is not one of \"http\", \"https\""),
            );
            None
        }
    });
    let listener = m.listener.clone();
    if let Some(name) = &listener {
        if !listen.iter().any(|l| l.name.as_deref() == Some(name)) {
            let names: Vec<&str> = listen.iter().filter_map(|l| l.name.as_deref()).collect();
            ck.err(
                &format!("{mpath}.listener"),
                match names.is_empty() {
                    true => format!("no listener is named {name:?} (give one a `name:`)"),
                    false => format!(
                        "no listener is named {name:?} (named: {})",
                        names.join(", ")
                    ),
                },
            );
        }
    }
    if let (Some(scheme), Some(name)) = (scheme, &listener) {
        let kinds = reachable_schemes(
            &Conditions {
                listener: Some(name.clone()),
                ..Conditions::default()
            },
            listen,
        );
        if !kinds.is_empty() && !kinds.contains(&scheme) {
            ck.err(
                mpath,
                format!(
                    "listener {name:?} takes no {} requests: the route can never match",
                    scheme.as_str()
                ),
            );
        }
    }
    let fields = |ck: &mut Checker, kind: &str, map: &BTreeMap<String, String>, header: bool| {
        let mut out = Vec::new();
        for (name, value) in map {
            let at = format!("{mpath}.{kind}.{name}");
            if name.is_empty() {
                ck.err(&format!("{mpath}.{kind}"), "an empty name".to_string());
                continue;
            }
            if header && http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                ck.err(&at, format!("{name:?} is not a header name"));
                continue;
            }
            match ValueMatch::parse(value) {
                Ok(m) => out.push((
                    match header {
                        true => name.to_ascii_lowercase(),
                        false => name.clone(),
                    },
                    m,
                )),
                Err(e) => ck.err(&at, e),
            }
        }
        out
    };
    let headers = fields(ck, "headers", &m.headers, true);
    let cookies = fields(ck, "cookies", &m.cookies, false);
    let query = fields(ck, "query", &m.query, false);
    Conditions {
        scheme,
        listener,
        headers,
        cookies,
        query,
    }
}

/// The schemes by which requests can reach a route with `conditions`: those of the
/// listeners it can be reached on (the named one, or all), narrowed by `scheme`.
fn reachable_schemes(conditions: &Conditions, listen: &[Listener]) -> Vec<Scheme> {
    let mut out = Vec::new();
    for l in listen {
        if conditions
            .listener
            .as_ref()
            .is_some_and(|n| l.name.as_ref() != Some(n))
        {
            continue;
        }
        let s = if l.tls.is_some() {
            Scheme::Https
        } else {
            Scheme::Http
        };
        if conditions.scheme.is_none_or(|c| c == s) && !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

/// If a request that matches the route would be redirected to a URL the same route
/// matches, that URL (as a sample request makes it); `None` when the redirect leaves (or
/// may: a literal host on a route for every host may be another server's).
fn redirect_loop(
    to: &str,
    host: Option<&str>,
    matcher: &PathMatch,
    schemes: &[Scheme],
) -> Option<String> {
    // A route without `host` takes every host: `{host}` is then the request's own, while a
    // literal host may well be another server's.
    let sample_host = host.unwrap_or("request-host.invalid");
    let sample_path = match matcher {
        PathMatch::Exact(p) | PathMatch::Prefix(p) => p.as_str(),
    };
    for &scheme in schemes {
        let url = to
            .replace("{scheme}", scheme.as_str())
            .replace("{host}", sample_host)
            .replace("{path}", sample_path)
            .replace("{query}", "");
        let (target_scheme, target_host, rest) = match url.split_once("://") {
            None if url.starts_with("//") => {
                let (h, r) = split_authority(&url[2..]);
                (Some(scheme), h, r)
            }
            None => (Some(scheme), sample_host.to_string(), url.as_str()),
            Some((s, after)) => {
                let s = match s.to_ascii_lowercase().as_str() {
                    "http" => Some(Scheme::Http),
                    "https" => Some(Scheme::Https),
                    _ => None,
                };
                let (h, r) = split_authority(after);
                (s, h, r)
            }
        };
        let Some(target_scheme) = target_scheme else {
            continue;
        };
        let target_path = rest.split(['?', '#']).next().unwrap_or("");
        let target_path = if target_path.is_empty() {
            "/"
        } else {
            target_path
        };
        let same_host = target_host == sample_host;
        let same_path = match matcher {
            PathMatch::Exact(p) => p == target_path,
            PathMatch::Prefix(p) => target_path.starts_with(p.as_str()),
        };
        if schemes.contains(&target_scheme) && same_host && same_path {
            let shown = host.unwrap_or("HOST");
            return Some(format!("{}://{shown}{sample_path}", scheme.as_str()));
        }
    }
    None
}

/// `host[:port]/rest` → the host (lower case, no port) and `/rest`.
fn split_authority(after: &str) -> (String, &str) {
    let end = after.find(['/', '?', '#']).unwrap_or(after.len());
    (normalize_host(&after[..end]), &after[end..])
}
