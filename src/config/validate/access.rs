//! A route's access control and what the gateway answers itself: `access` (networks),
//! `auth` (basic, api_key, jwt, forward, with their files read here), `cors`, `rewrite`,
//! `redirect`; and `clients.trusted_proxies`. Every file is read and checked now, so `-t`
//! and a reload report a bad htpasswd line, key file or JWKS like any other mistake.

use std::net::{IpAddr, ToSocketAddrs};
use std::str::FromStr;

use ipnet::IpNet;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey};

use super::*;

/// A list of networks (`10.0.0.0/8`) and single addresses (`127.0.0.1`, `::1`).
pub(super) fn networks(ck: &mut Checker, path: &str, items: Option<Vec<String>>) -> Vec<IpNet> {
    let mut out = Vec::new();
    for (i, text) in items.unwrap_or_default().iter().enumerate() {
        let t = text.trim();
        match IpNet::from_str(t).or_else(|_| IpAddr::from_str(t).map(IpNet::from)) {
            Ok(net) => out.push(net.trunc()),
            Err(_) => ck.err(
                &format!("{path}[{i}]"),
                format!("{text:?} is not an address or a network such as 10.0.0.0/8"),
            ),
        }
    }
    out
}

pub(super) fn build_access(ck: &mut Checker, path: &str, f: FileAccess) -> AccessList {
    AccessList {
        allow: networks(ck, &format!("{path}.allow"), f.allow),
        deny: networks(ck, &format!("{path}.deny"), f.deny),
    }
}

/// Reads a file named by the configuration; the error names it.
fn read_file(ck: &mut Checker, path: &str, file: &str) -> Option<Vec<u8>> {
    std::fs::read(file)
        .map_err(|e| ck.err(path, format!("cannot read {file}: {e}")))
        .ok()
}

fn read_text(ck: &mut Checker, path: &str, file: &str) -> Option<String> {
    let bytes = read_file(ck, path, file)?;
    String::from_utf8(bytes)
        .map_err(|_| ck.err(path, format!("{file} is not UTF-8 text")))
        .ok()
}

pub(super) fn build_auth(
    ck: &mut Checker,
    path: &str,
    label: &str,
    f: FileAuth,
) -> Option<AuthConfig> {
    let given = [
        f.basic.is_some(),
        f.api_key.is_some(),
        f.jwt.is_some(),
        f.forward.is_some(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        ck.err(
            path,
            "needs exactly one of `basic`, `api_key`, `jwt` and `forward`",
        );
        return None;
    }
    if let Some(b) = f.basic {
        return basic(ck, &format!("{path}.basic"), b).map(AuthConfig::Basic);
    }
    if let Some(k) = f.api_key {
        return api_key(ck, &format!("{path}.api_key"), k).map(AuthConfig::ApiKey);
    }
    if let Some(j) = f.jwt {
        return jwt(ck, &format!("{path}.jwt"), label, j).map(AuthConfig::Jwt);
    }
    let forward = f.forward?;
    forward_auth(ck, &format!("{path}.forward"), label, forward)
        .map(|f| AuthConfig::Forward(Box::new(f)))
}

/// An htpasswd file: `user:hash` lines, bcrypt hashes only (`htpasswd -B`).
fn basic(ck: &mut Checker, path: &str, f: FileBasicAuth) -> Option<BasicAuthConfig> {
    let fpath = format!("{path}.htpasswd");
    let text = read_text(ck, &fpath, &f.htpasswd)?;
    let before = ck.errors.len();
    let mut users: Vec<(String, String)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = format!("{}:{}", f.htpasswd, n + 1);
        let Some((user, hash)) = line.split_once(':') else {
            ck.err(&fpath, format!("{at}: expected user:hash"));
            continue;
        };
        let bcrypt = ["$2a$", "$2b$", "$2x$", "$2y$"]
            .iter()
            .any(|p| hash.starts_with(p))
            && bcrypt::HashParts::from_str(hash).is_ok();
        if !bcrypt {
            ck.err(
                &fpath,
                format!(
                    "{at}: user {user:?} has a weaker or unknown hash kind; only bcrypt entries \
                     are accepted (htpasswd -B)"
                ),
            );
            continue;
        }
        if users.iter().any(|(u, _)| u == user) {
            ck.err(&fpath, format!("{at}: user {user:?} is listed twice"));
            continue;
        }
        users.push((user.to_string(), hash.to_string()));
    }
    if users.is_empty() && ck.errors.len() == before {
        ck.err(&fpath, format!("{} has no users", f.htpasswd));
    }
    (ck.errors.len() == before).then(|| BasicAuthConfig {
        realm: f.realm.unwrap_or_else(|| "fanout".to_string()),
        users,
    })
}

/// A keys file: one key per line, optionally followed by the name it stands for.
fn api_key(ck: &mut Checker, path: &str, f: FileApiKey) -> Option<ApiKeyConfig> {
    let from = match (f.header, f.query) {
        (Some(h), None) => match HeaderName::from_bytes(h.as_bytes()) {
            Ok(h) => CredentialFrom::Header(h),
            Err(_) => {
                ck.err(
                    &format!("{path}.header"),
                    format!("invalid header name {h:?}"),
                );
                return None;
            }
        },
        (None, Some(q)) if !q.is_empty() => CredentialFrom::Query(q),
        (None, None) => CredentialFrom::Header(HeaderName::from_static("x-api-key")),
        _ => {
            ck.err(path, "takes one of `header` and `query`, not both");
            return None;
        }
    };
    let fpath = format!("{path}.keys_file");
    let text = read_text(ck, &fpath, &f.keys_file)?;
    let before = ck.errors.len();
    let mut keys: Vec<ApiKey> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let key = parts.next().unwrap_or_default().to_string();
        let name = parts.next().map(String::from);
        let at = format!("{}:{}", f.keys_file, n + 1);
        if parts.next().is_some() {
            ck.err(&fpath, format!("{at}: expected a key and an optional name"));
        } else if key.len() < 16 {
            ck.err(
                &fpath,
                format!("{at}: a key must be at least 16 characters"),
            );
        } else if keys.iter().any(|k| k.key == key) {
            ck.err(&fpath, format!("{at}: the same key is listed twice"));
        } else {
            keys.push(ApiKey { key, name });
        }
    }
    if keys.is_empty() && ck.errors.len() == before {
        ck.err(&fpath, format!("{} has no keys", f.keys_file));
    }
    (ck.errors.len() == before).then_some(ApiKeyConfig { from, keys })
}

fn jwt(ck: &mut Checker, path: &str, label: &str, f: FileJwt) -> Option<JwtConfig> {
    let before = ck.errors.len();
    let keys = match (&f.jwks_file, &f.jwks_url, &f.secret_file) {
        (Some(file), None, None) => {
            let kpath = format!("{path}.jwks_file");
            let text = read_text(ck, &kpath, file)?;
            match jwks(&text) {
                Ok(set) => Some(JwtKeys::Set(set)),
                Err(e) => {
                    ck.err(&kpath, format!("{file}: {e}"));
                    None
                }
            }
        }
        (None, Some(url), None) => {
            let refresh = f.refresh.map_or(DEFAULT_JWKS_REFRESH, |d| d.0);
            if refresh < Duration::from_secs(1) {
                ck.err(&format!("{path}.refresh"), "must be at least 1s");
            }
            service_url(
                ck,
                &format!("{path}.jwks_url"),
                &format!("jwks:{label}"),
                url,
                Duration::from_secs(5),
            )
            .map(|service| JwtKeys::Url {
                service: Box::new(service),
                refresh,
            })
        }
        (None, None, Some(file)) => {
            let spath = format!("{path}.secret_file");
            let secret = read_file(ck, &spath, file)?;
            // A trailing newline is not part of the secret.
            let secret = secret.trim_ascii_end().to_vec();
            if secret.len() < 32 {
                ck.err(
                    &spath,
                    format!("{file}: an HMAC secret must be at least 32 bytes"),
                );
            }
            Some(JwtKeys::Secret(secret))
        }
        _ => {
            ck.err(
                path,
                "needs exactly one of `jwks_file`, `jwks_url` and `secret_file`",
            );
            None
        }
    };
    if f.refresh.is_some() && f.jwks_url.is_none() {
        ck.warn(&format!("{path}.refresh"), "applies only with `jwks_url`");
    }
    let hmac = f.secret_file.is_some();
    let algorithms: Vec<Algorithm> = match &f.algorithms {
        None if hmac => vec![Algorithm::HS256],
        None => vec![Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA],
        Some(names) => names
            .iter()
            .enumerate()
            .filter_map(|(i, name)| {
                let apath = format!("{path}.algorithms[{i}]");
                let alg = match Algorithm::from_str(name) {
                    Ok(a) => a,
                    Err(_) => {
                        ck.err(&apath, format!("unknown algorithm {name:?}"));
                        return None;
                    }
                };
                let is_hmac = matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
                match (is_hmac, hmac) {
                    (true, false) => {
                        ck.err(
                            &apath,
                            format!("{name} needs a `secret_file` (and only that)"),
                        );
                        None
                    }
                    (false, true) => {
                        ck.err(
                            &apath,
                            format!("{name} needs public keys, not a `secret_file`"),
                        );
                        None
                    }
                    _ => Some(alg),
                }
            })
            .collect(),
    };
    if algorithms.is_empty() && ck.errors.len() == before {
        ck.err(
            &format!("{path}.algorithms"),
            "needs at least one algorithm",
        );
    }
    let leeway = f.leeway.map_or(DEFAULT_JWT_LEEWAY, |d| d.0);
    let claims_to_headers = f
        .claims_to_headers
        .unwrap_or_default()
        .into_iter()
        .filter_map(
            |(claim, header)| match HeaderName::from_bytes(header.as_bytes()) {
                Ok(h) => Some((claim, h)),
                Err(_) => {
                    ck.err(
                        &format!("{path}.claims_to_headers.{claim}"),
                        format!("invalid header name {header:?}"),
                    );
                    None
                }
            },
        )
        .collect();
    let header = f
        .header
        .and_then(|h| match HeaderName::from_bytes(h.as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                ck.err(
                    &format!("{path}.header"),
                    format!("invalid header name {h:?}"),
                );
                None
            }
        });
    let keys = keys?;
    (ck.errors.len() == before).then(|| JwtConfig {
        keys,
        issuer: f.issuer,
        audience: f.audience.unwrap_or_default(),
        algorithms,
        leeway,
        claims_to_headers,
        header,
    })
}

/// A JWKS document whose every key the gateway can check signatures with (RSA, EC P-256/
/// P-384, Ed25519). An HMAC (`oct`) key in a key set is refused: shared secrets go in a
/// `secret_file`.
pub fn jwks(text: &str) -> Result<JwkSet, String> {
    let set: JwkSet =
        serde_json::from_str(text).map_err(|e| format!("not a JWKS document: {e}"))?;
    if set.keys.is_empty() {
        return Err("the key set is empty".into());
    }
    for (i, key) in set.keys.iter().enumerate() {
        if matches!(
            key.algorithm,
            jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)
        ) {
            return Err(format!(
                "key {i} is a shared secret (kty oct): use `secret_file`"
            ));
        }
        DecodingKey::from_jwk(key).map_err(|e| format!("key {i}: {e}"))?;
    }
    Ok(set)
}

fn forward_auth(
    ck: &mut Checker,
    path: &str,
    label: &str,
    f: FileForwardAuth,
) -> Option<ForwardAuthConfig> {
    let before = ck.errors.len();
    let timeout = f.timeout.map_or(DEFAULT_FORWARD_AUTH_TIMEOUT, |d| d.0);
    positive(ck, &format!("{path}.timeout"), timeout);
    let request_headers = match f.request_headers {
        None => vec![http::header::AUTHORIZATION, http::header::COOKIE],
        names => header_names(ck, &format!("{path}.request_headers"), names),
    };
    let response_headers = match f.response_headers {
        None => Vec::new(),
        names => header_names(ck, &format!("{path}.response_headers"), names),
    };
    let service = service_url(
        ck,
        &format!("{path}.url"),
        &format!("auth:{label}"),
        &f.url,
        timeout,
    );
    let service = service?;
    (ck.errors.len() == before).then(|| ForwardAuthConfig {
        service,
        request_headers,
        response_headers,
        cache: f.cache.map_or(Duration::ZERO, |d| d.0),
        timeout,
    })
}

/// An `http://` or `https://` URL the gateway asks itself, as an upstream of its own. A
/// host name is resolved now (at start and at each reload), like nginx's `proxy_pass`.
pub(super) fn service_url(
    ck: &mut Checker,
    path: &str,
    name: &str,
    url: &str,
    timeout: Duration,
) -> Option<ServiceUrl> {
    let bad = |ck: &mut Checker, why: &str| {
        ck.err(path, format!("{url:?}: {why}"));
        None
    };
    let Ok(uri) = url.parse::<http::Uri>() else {
        return bad(ck, "not a URL");
    };
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return bad(ck, "expected an http:// or https:// URL"),
    };
    let Some(authority) = uri.authority() else {
        return bad(ck, "has no host");
    };
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => match (host, port).to_socket_addrs() {
            Ok(a) => {
                let mut v: Vec<SocketAddr> = a.collect();
                v.dedup();
                v
            }
            Err(e) => return bad(ck, &format!("cannot resolve {host}: {e}")),
        },
    };
    if addrs.is_empty() {
        return bad(ck, &format!("{host} has no address"));
    }
    let named = host.parse::<IpAddr>().is_err();
    let upstream = UpstreamConfig {
        name: name.to_string(),
        balance: Balance::RoundRobin,
        hash_key: KeySource::ClientIp,
        backends: addrs
            .into_iter()
            .map(|addr| BackendConfig {
                addr,
                weight: DEFAULT_WEIGHT,
                host: named.then(|| host.to_string()),
                name: None,
            })
            .collect(),
        discover: Vec::new(),
        host_header: HostHeader::Pass,
        sticky: None,
        health_check: None,
        breaker: None,
        timeouts: Timeouts {
            connect: timeout.min(Duration::from_secs(1)),
            read: timeout,
            write: timeout,
            ..Timeouts::default()
        },
        retries: 0,
        retry_budget: None,
        concurrency: None,
        tls: https.then(|| UpstreamTls {
            sni: None,
            verify: true,
            ca: None,
            client_cert: None,
        }),
        protocol: Protocol::H1,
    };
    Some(ServiceUrl {
        url: url.to_string(),
        upstream,
        path: uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string()),
        host: authority.as_str().to_string(),
    })
}

pub(super) fn build_cors(ck: &mut Checker, path: &str, f: FileCors) -> CorsConfig {
    let credentials = f.credentials.unwrap_or(false);
    let any = f.origins.iter().any(|o| o == "*");
    if f.origins.is_empty() {
        ck.err(
            &format!("{path}.origins"),
            "needs at least one origin (or \"*\")",
        );
    }
    if any && f.origins.len() > 1 {
        ck.err(&format!("{path}.origins"), "\"*\" stands alone");
    }
    if any && credentials {
        ck.err(
            &format!("{path}.origins"),
            "\"*\" with credentials: true is refused by browsers (name the origins)",
        );
    }
    let mut origins = Vec::new();
    for (i, o) in f.origins.iter().enumerate().filter(|_| !any) {
        let origin = o.trim_end_matches('/').to_ascii_lowercase();
        let ok = origin.split_once("://").is_some_and(|(scheme, rest)| {
            !scheme.is_empty() && !rest.is_empty() && !rest.contains('/')
        }) && HeaderValue::from_str(&origin).is_ok();
        if ok {
            origins.push(origin);
        } else {
            ck.err(
                &format!("{path}.origins[{i}]"),
                format!("{o:?} is not an origin such as https://app.example.com"),
            );
        }
    }
    let methods = match f.methods {
        None => vec![Method::GET, Method::HEAD, Method::POST],
        Some(ms) => ms
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| {
                        ck.err(
                            &format!("{path}.methods[{i}]"),
                            format!("invalid method {m:?}"),
                        )
                    })
                    .ok()
            })
            .collect(),
    };
    let names = |ck: &mut Checker, key: &str, v: Option<Vec<String>>| match v {
        None => Vec::new(),
        v => header_names(ck, &format!("{path}.{key}"), v),
    };
    CorsConfig {
        origins,
        methods,
        headers: names(ck, "headers", f.headers),
        expose_headers: names(ck, "expose_headers", f.expose_headers),
        credentials,
        max_age: f.max_age.map_or(Duration::ZERO, |d| d.0),
    }
}

pub(super) fn build_rewrite(ck: &mut Checker, path: &str, f: FileRewrite) -> Option<RewriteConfig> {
    let regex = regex::RegexBuilder::new(&f.regex)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| {
            // The regex crate's message spans lines: one line per problem.
            let message = e.to_string().replace('\n', " ");
            ck.err(
                &format!("{path}.regex"),
                format!("invalid regex: {message}"),
            )
        })
        .ok();
    if !f.to.starts_with('/') && !f.to.starts_with('$') {
        ck.err(
            &format!("{path}.to"),
            format!("{:?} must start with /", f.to),
        );
    }
    Some(RewriteConfig {
        regex: regex?,
        to: f.to,
    })
}

/// The placeholders a redirect template may use.
pub const REDIRECT_FIELDS: [&str; 4] = ["scheme", "host", "path", "query"];

pub(super) fn build_redirect(
    ck: &mut Checker,
    path: &str,
    f: FileRedirect,
) -> Option<RedirectConfig> {
    let before = ck.errors.len();
    let status = f.status.unwrap_or(302);
    if ![301, 302, 303, 307, 308].contains(&status) {
        ck.err(
            &format!("{path}.status"),
            format!("{status} is not one of 301, 302, 303, 307, 308"),
        );
    }
    let mut rest = f.to.as_str();
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) if REDIRECT_FIELDS.contains(&&after[..close]) => rest = &after[close + 1..],
            _ => {
                ck.err(
                    &format!("{path}.to"),
                    format!(
                        "{:?}: placeholders are {{scheme}}, {{host}}, {{path}} and {{query}}",
                        f.to
                    ),
                );
                break;
            }
        }
    }
    if f.to.is_empty() || HeaderValue::from_str(&f.to).is_err() {
        ck.err(&format!("{path}.to"), "must be a URL or a path");
    }
    (ck.errors.len() == before).then_some(RedirectConfig { to: f.to, status })
}
