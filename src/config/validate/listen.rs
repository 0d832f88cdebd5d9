//! `listen:`: plain, TLS and h2c listeners, `:PORT` as every address (IPv4 and, where the
//! host has it, IPv6).

use super::*;

/// `listen:`: one address or listener, or a list of them; at least one, none twice.
pub(super) fn build_listen(ck: &mut Checker, value: Option<Value>) -> Vec<Listener> {
    let listen: Vec<Listener> = match value {
        None => {
            ck.err("listen", "at least one listen address is required");
            Vec::new()
        }
        Some(Value::Sequence(items)) => items
            .into_iter()
            .enumerate()
            .flat_map(|(i, v)| build_listener(ck, &format!("listen[{i}]"), v))
            .collect(),
        Some(v) => build_listener(ck, "listen", v),
    };
    let mut seen = HashSet::new();
    for l in &listen {
        if !seen.insert(l.addr) {
            ck.err("listen", format!("{} is listed twice", l.addr));
        }
    }
    // `:PORT` makes two sockets of one entry, sharing its name: a name is taken twice
    // only when two entries of different ports or kinds carry it.
    let mut names: HashMap<&str, SocketAddr> = HashMap::new();
    for l in &listen {
        let Some(name) = l.name.as_deref() else {
            continue;
        };
        match names.get(name) {
            Some(first) if first.port() != l.addr.port() => {
                ck.err("listen", format!("listener name {name:?} is given twice"));
            }
            Some(_) => {}
            None => {
                names.insert(name, l.addr);
            }
        }
    }
    listen
}

/// One `listen:` entry: `"IP:PORT"`, `":PORT"` (every address: one IPv4 socket, and one
/// IPv6 socket where the host has IPv6), or `{address, tls, http2}`.
pub(super) fn build_listener(ck: &mut Checker, path: &str, value: Value) -> Vec<Listener> {
    let f = match value {
        Value::String(address) => FileListener {
            address,
            name: None,
            tls: None,
            http2: None,
            proxy_protocol: None,
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
pub(super) fn every_address_port(text: &str) -> Option<u16> {
    text.strip_prefix(':')?.parse().ok()
}

/// Whether an IPv6 socket can be bound here (a host or container without IPv6 cannot).
pub(super) fn host_has_ipv6() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| std::net::TcpListener::bind("[::]:0").is_ok())
}

/// A listener's settings (TLS, h2), its address left unspecified for the caller to set.
pub(super) fn build_one_listener(
    ck: &mut Checker,
    path: &str,
    f: FileListener,
) -> Option<Listener> {
    let http2 = f.http2.unwrap_or(f.tls.is_some());
    if f.name.as_deref() == Some("") {
        ck.err(&format!("{path}.name"), "must not be empty");
    }
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
        name: f.name,
        tls,
        http2,
        proxy_protocol: f.proxy_protocol.unwrap_or(false),
    })
}

/// An `IP:PORT`; `expected` says what else the key takes, for the error.
pub(super) fn parse_listen(
    ck: &mut Checker,
    path: &str,
    text: &str,
    expected: &str,
) -> Option<SocketAddr> {
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
