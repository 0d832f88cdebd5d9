//! TLS material, both sides: the certificates a TLS listener serves (read and checked when
//! the configuration is, so `fanout -t` names a missing file, a key that does not match its
//! certificate or an expired certificate), the SNI resolver that picks one of them per
//! handshake, the listener's rustls configuration, and what a TLS upstream's connections
//! need from Pingora's connector (CA roots, client certificate).
//!
//! One library on both sides: rustls with the *ring* provider, the one Pingora's `rustls`
//! feature uses for its connector. It needs no system library (README, bench/RESULTS.md).

use std::collections::HashMap;
use std::fs;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use pingora_core::utils::tls::{CertKey, WrappedX509};
use rustls::crypto::ring::{default_provider, sign::any_supported_type};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, SupportedProtocolVersion};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A listener's certificate with its key, and the names (SAN) it answers for.
#[derive(Clone)]
pub struct ServerCert {
    pub key: Arc<CertifiedKey>,
    /// Lower-case DNS names, wildcards (`*.example.com`) included.
    pub names: Vec<String>,
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCert")
            .field("names", &self.names)
            .finish()
    }
}

/// Reads every certificate of a PEM file, leaf first.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let file = fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: invalid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let file = fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(|e| format!("{}: invalid PEM: {e}", path.display()))?
        .ok_or_else(|| format!("{}: no private key in it", path.display()))
}

/// The parsed leaf of a chain, or why it cannot be used.
fn parse_leaf<'a>(der: &'a CertificateDer<'_>, path: &Path) -> Result<X509Certificate<'a>, String> {
    X509Certificate::from_der(der.as_ref())
        .map(|(_, c)| c)
        .map_err(|e| format!("{}: invalid certificate: {e}", path.display()))
}

/// Checks that a certificate is valid now (not expired, not yet valid).
fn check_validity(leaf: &X509Certificate<'_>, path: &Path) -> Result<(), String> {
    let validity = leaf.validity();
    if !validity.is_valid() {
        return Err(format!(
            "{}: certificate is not valid now (valid from {} to {})",
            path.display(),
            validity.not_before,
            validity.not_after
        ));
    }
    Ok(())
}

/// Loads a listener's certificate and key, and checks them: the key signs for the
/// certificate, the certificate is valid now and names at least one host.
pub fn load_server_cert(cert: &Path, key: &Path) -> Result<ServerCert, String> {
    let chain = read_certs(cert)?;
    let private = read_key(key)?;
    let leaf = parse_leaf(&chain[0], cert)?;
    check_validity(&leaf, cert)?;
    let mut names: Vec<String> = Vec::new();
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(n) = name {
                names.push(n.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        // No SAN: the subject's common name, as older clients read it.
        names.extend(
            leaf.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(|cn| cn.to_ascii_lowercase()),
        );
    }
    let signer = any_supported_type(&private)
        .map_err(|e| format!("{}: unsupported private key: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|_| {
        format!(
            "{}: the key does not match the certificate {}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(ServerCert {
        key: Arc::new(certified),
        names,
    })
}

/// Picks a listener's certificate by the name the client asked for (SNI): an exact name,
/// else a wildcard one level up, else the first certificate.
#[derive(Debug)]
pub struct SniResolver {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    /// `None` for an empty list (refused earlier, by the configuration check).
    pub fn new(certs: &[ServerCert]) -> Option<SniResolver> {
        let default = Arc::clone(&certs.first()?.key);
        let mut by_name = HashMap::new();
        for cert in certs {
            for name in &cert.names {
                // The first certificate that names a host keeps it.
                by_name
                    .entry(name.clone())
                    .or_insert_with(|| Arc::clone(&cert.key));
            }
        }
        Some(SniResolver { by_name, default })
    }

    fn lookup(&self, name: &str) -> Arc<CertifiedKey> {
        let name = name.to_ascii_lowercase();
        if let Some(k) = self.by_name.get(&name) {
            return Arc::clone(k);
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(k) = self.by_name.get(&format!("*.{parent}")) {
                return Arc::clone(k);
            }
        }
        Arc::clone(&self.default)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(match hello.server_name() {
            Some(name) => self.lookup(name),
            None => Arc::clone(&self.default),
        })
    }
}

/// TLS versions a listener accepts: from `min_version` up to 1.3.
pub fn versions(min_tls13: bool) -> &'static [&'static SupportedProtocolVersion] {
    static BOTH: [&SupportedProtocolVersion; 2] =
        [&rustls::version::TLS13, &rustls::version::TLS12];
    static ONLY13: [&SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    if min_tls13 {
        &ONLY13
    } else {
        &BOTH
    }
}

/// A TLS listener's rustls configuration: ring's default (modern, AEAD-only) cipher suites,
/// session resumption by tickets and by a session cache, ALPN `h2` then `http/1.1` when
/// HTTP/2 is on.
pub fn server_config(
    certs: &[ServerCert],
    min_tls13: bool,
    http2: bool,
) -> Result<Arc<ServerConfig>, String> {
    let resolver = SniResolver::new(certs).ok_or("a TLS listener needs a certificate")?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(default_provider()))
        .with_protocol_versions(versions(min_tls13))
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = match http2 {
        true => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        false => vec![b"http/1.1".to_vec()],
    };
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(20_000);
    config.ticketer =
        rustls::crypto::ring::Ticketer::new().map_err(|e| format!("TLS session tickets: {e}"))?;
    Ok(Arc::new(config))
}

/// Reads the CA certificates an upstream's certificates are verified against, in the form
/// Pingora's connector takes.
pub fn load_ca(path: &Path) -> Result<Arc<[WrappedX509]>, String> {
    let certs = read_certs(path)?;
    certs
        .iter()
        .map(|der| {
            parse_leaf(der, path)?;
            Ok(WrappedX509::new(der.as_ref().to_vec(), |raw| {
                // Parsed once above: this cannot fail.
                X509Certificate::from_der(raw.as_slice())
                    .map(|(_, c)| c)
                    .unwrap_or_else(|_| unreachable!("checked certificate"))
            }))
        })
        .collect::<Result<Vec<_>, String>>()
        .map(Arc::from)
}

/// Reads an upstream's client certificate and key (mutual TLS), checked like a listener's.
pub fn load_client_cert(cert: &Path, key: &Path) -> Result<Arc<CertKey>, String> {
    load_server_cert(cert, key)?;
    let chain = read_certs(cert)?;
    let private = read_key(key)?;
    Ok(Arc::new(CertKey::new(
        chain.iter().map(|c| c.as_ref().to_vec()).collect(),
        private.secret_der().to_vec(),
    )))
}
