//! `upstreams:`: backends as written (addresses, `https://` URLs, DNS names), balancing,
//! health checks, breakers, timeouts, TLS to the backends.

use super::*;

/// A backend as written: `IP:PORT` or `host:PORT`, either behind `http://`, or behind
/// `https://` (TLS, verified against the host name). A host name is not resolved here: it
/// stands for every address DNS gives it, looked up at start and again every
/// [`DEFAULT_DNS_INTERVAL`] ([`crate::upstream::discovery`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BackendAddr {
    pub target: BackendTarget,
    pub https: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum BackendTarget {
    Addr(SocketAddr),
    /// A host name (lower case) and a port.
    Name(String, u16),
}

pub(super) fn parse_backend_addr(text: &str) -> Result<BackendAddr, String> {
    let t = text.trim();
    let (https, t) = match (t.strip_prefix("https://"), t.strip_prefix("http://")) {
        (Some(rest), _) => (true, rest),
        (None, Some(rest)) => (false, rest),
        (None, None) => (false, t),
    };
    let t = t.trim_end_matches('/');
    if let Ok(addr) = t.parse::<SocketAddr>() {
        return Ok(BackendAddr {
            target: BackendTarget::Addr(addr),
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
        target: BackendTarget::Name(host, port),
        https,
    })
}

/// Whether `name` is a host name: dot-separated labels of letters, digits, `-` and `_`.
pub(super) fn is_dns_name(name: &str) -> bool {
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
pub(super) fn build_upstream_tls(
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
pub(super) fn build_upstreams(
    ck: &mut Checker,
    map: Mapping,
) -> Vec<(String, Option<UpstreamConfig>)> {
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

pub(super) fn build_upstream(
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
            match KeySource::parse(
                k,
                &[
                    "client_ip",
                    "path",
                    "header:NAME",
                    "cookie:NAME",
                    "query:NAME",
                ],
            ) {
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
    let mut names: HashSet<String> = HashSet::new();
    for (i, value) in f.backends.into_iter().enumerate() {
        let bpath = format!("{path}.backends[{i}]");
        let (address, weight, display) = match value {
            Value::String(s) => (s, None, None),
            Value::Mapping(m) if m.contains_key("dns") => {
                if let Some(d) = ck.parse::<FileDnsBackend>(&bpath, Value::Mapping(m)) {
                    if let Some(d) = build_dns_backend(ck, &bpath, d) {
                        add_named(ck, &bpath, &mut discover, d);
                    }
                }
                continue;
            }
            other => match ck.parse::<FileBackend>(&bpath, other) {
                Some(b) => (b.address, b.weight, b.name),
                None => continue,
            },
        };
        let weight = weight.unwrap_or(DEFAULT_WEIGHT);
        if let Some(n) = &display {
            if n.trim().is_empty() {
                ck.err(&format!("{bpath}.name"), "must not be empty");
            } else if !names.insert(n.clone()) {
                ck.err(
                    &format!("{bpath}.name"),
                    format!("name {n:?} is given twice"),
                );
            }
        }
        if !(1..=10_000).contains(&weight) {
            ck.err(
                &format!("{bpath}.weight"),
                format!("weight {weight} is out of range 1..=10000"),
            );
            continue;
        }
        match parse_backend_addr(&address) {
            Ok(BackendAddr {
                target: BackendTarget::Addr(addr),
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
                        name: display,
                    });
                }
            }
            Ok(BackendAddr {
                target: BackendTarget::Name(name, port),
                https: tls,
            }) => {
                https.push(tls);
                let d = DnsBackend {
                    name,
                    port,
                    weight,
                    interval: DEFAULT_DNS_INTERVAL,
                    display,
                    resolves_to: ResolvesTo::OneBackend,
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
            connect_only: false,
        }
    });
    // Without `breaker:`, passive ejection of backends whose connects fail.
    let breaker = Some(breaker.unwrap_or_else(BreakerConfig::ejection));
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
    let retry_budget = f.retry_budget.and_then(|share| {
        let value = match &share {
            Share::Fraction(x) => Some(*x),
            Share::Text(t) => t
                .trim()
                .strip_suffix('%')
                .and_then(|p| p.trim().parse::<f64>().ok())
                .map(|p| p / 100.0),
        };
        match value {
            Some(x) if x > 0.0 && x <= 1.0 => Some(x),
            _ => {
                ck.err(
                    &format!("{path}.retry_budget"),
                    format!("{share:?} is not a share such as 20% (more than 0, at most 100%)"),
                );
                None
            }
        }
    });
    let concurrency = f
        .concurrency
        .map(|c| build_concurrency(ck, &format!("{path}.concurrency"), c));
    let protocol = f.protocol.unwrap_or(Protocol::H1);
    let host_header = match f.host_header.as_deref() {
        None | Some("pass") => HostHeader::Pass,
        Some("backend") => HostHeader::Backend,
        Some(literal) => match literal.parse::<http::uri::Authority>() {
            Ok(a) if !literal.contains('@') => match HeaderValue::from_str(a.as_str()) {
                Ok(v) => HostHeader::Literal(v),
                Err(_) => {
                    ck.err(&format!("{path}.host_header"), "not a valid Host value");
                    HostHeader::Pass
                }
            },
            _ => {
                ck.err(
                    &format!("{path}.host_header"),
                    format!("{literal:?} is not `pass`, `backend` or a host name (with an optional :port)"),
                );
                HostHeader::Pass
            }
        },
    };
    let sticky = f.sticky.map(|st| {
        let cookie = st
            .cookie
            .unwrap_or_else(|| DEFAULT_STICKY_COOKIE.to_string());
        let token = !cookie.is_empty()
            && cookie
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token {
            ck.err(
                &format!("{path}.sticky.cookie"),
                format!("{cookie:?} is not a cookie name (letters, digits, -_.!#$%&'*+^`|~)"),
            );
        }
        let ttl = st.ttl.map_or(DEFAULT_STICKY_TTL, |d| d.0);
        if ttl.is_zero() {
            ck.err(&format!("{path}.sticky.ttl"), "must be more than 0s");
        }
        StickyConfig {
            cookie,
            ttl,
            secure: st.secure,
            http_only: st.http_only.unwrap_or(true),
        }
    });
    (ck.errors.len() == before).then(|| UpstreamConfig {
        sticky,
        retry_budget,
        concurrency,
        name: name.to_string(),
        tls,
        protocol,
        host_header,
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
pub(super) fn add_named(
    ck: &mut Checker,
    path: &str,
    discover: &mut Vec<DnsBackend>,
    d: DnsBackend,
) {
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
pub(super) fn build_dns_backend(
    ck: &mut Checker,
    path: &str,
    d: FileDnsBackend,
) -> Option<DnsBackend> {
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
        display: None,
        resolves_to: ResolvesTo::EachABackend,
    })
}

/// `concurrency:`, with the defaults of what it leaves out.
fn build_concurrency(ck: &mut Checker, path: &str, f: FileConcurrency) -> ConcurrencyConfig {
    let d = ConcurrencyConfig::default();
    let min = at_least_one(ck, &format!("{path}.min"), f.min.unwrap_or(d.min));
    let max = f.max.unwrap_or(d.max.max(min));
    if max < min {
        ck.err(
            &format!("{path}.max"),
            format!("max {max} is below min {min}"),
        );
    } else if max > MAX_CONCURRENCY {
        ck.err(
            &format!("{path}.max"),
            format!("max {max} is over {MAX_CONCURRENCY}"),
        );
    }
    let max_queue_wait = f.max_queue_wait.map_or(d.max_queue_wait, |w| w.0);
    if max_queue_wait > MAX_QUEUE_WAIT {
        ck.err(
            &format!("{path}.max_queue_wait"),
            format!("{max_queue_wait:?} is over {MAX_QUEUE_WAIT:?}: a queue that long is the overload this limit is there to prevent"),
        );
    }
    ConcurrencyConfig {
        min,
        max,
        max_queue_wait,
    }
}
