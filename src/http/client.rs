//! Who the client is. The connection's peer is the socket's remote address, or the source
//! address a PROXY protocol header gave (`edge::proxy_protocol`, which sets it on the
//! socket's digest). When that peer is one of `clients.trusted_proxies`, `X-Forwarded-For`
//! is believed: the client is the right-most address of the chain that is not a trusted
//! proxy. The result is worked out once per request ([`Client::of`]) and is what `access`,
//! rate-limit keys, consistent hashing, the access log and the `X-Forwarded-For` sent
//! upstream all use; `auth` adds the identity it found.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use pingora_proxy::Session;

/// The client of one request.
#[derive(Debug, Clone, Default)]
pub struct Client {
    /// The client's address: the peer's, or (from a trusted proxy) the right-most
    /// untrusted one of `X-Forwarded-For`.
    pub ip: Option<IpAddr>,
    /// The connection's peer (the last proxy, when a trusted one forwarded the request).
    pub peer: Option<IpAddr>,
    /// How many entries of the received `X-Forwarded-For`, counted from its right end,
    /// are believed (the client's own included); 0: none, the chain starts afresh.
    pub believed: usize,
    /// It came over TLS.
    pub https: bool,
    /// The authenticated user or key, once `auth` passed the request.
    pub identity: Option<Arc<str>>,
}

impl Client {
    /// The client of `session`'s current request, believing `X-Forwarded-For` from
    /// `trusted` peers only.
    pub fn of(session: &Session, trusted: &[IpNet]) -> Client {
        let peer = peer_ip(session);
        let https = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        let mut client = Client {
            ip: peer,
            peer,
            believed: 0,
            https,
            identity: None,
        };
        if let Some(p) = peer.filter(|p| is_trusted(*p, trusted)) {
            let chain = chain(&session.req_header().headers);
            let (ip, believed) = resolve(p, &chain, trusted);
            client.ip = Some(ip);
            client.believed = believed;
        }
        client
    }
}

/// The socket's remote address (or PROXY protocol's source), IPv4-mapped IPv6 addresses
/// written as IPv4.
pub fn peer_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_canonical())
}

fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|n| n.contains(&ip))
}

/// The addresses of every `X-Forwarded-For` field, left to right (`None` for an entry
/// that is not an address).
pub fn chain(headers: &http::HeaderMap) -> Vec<Option<IpAddr>> {
    headers
        .get_all("x-forwarded-for")
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(|entry| parse_entry(entry.trim()))
        .collect()
}

/// One entry: an address, with a port or brackets as some proxies write them.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(sa) = entry.parse::<std::net::SocketAddr>() {
        return Some(sa.ip().to_canonical());
    }
    entry
        .strip_prefix('[')
        .and_then(|e| e.strip_suffix(']'))
        .and_then(|e| e.parse::<IpAddr>().ok())
}

/// Walks the chain from the right, from a trusted peer: the first address that is not a
/// trusted proxy is the client. An entry that is not an address stops the walk: what is
/// left of it cannot be believed, so the last trusted hop is the client. Returns the
/// client and how many entries were believed.
fn resolve(peer: IpAddr, chain: &[Option<IpAddr>], trusted: &[IpNet]) -> (IpAddr, usize) {
    let mut client = peer;
    for (n, entry) in chain.iter().rev().enumerate() {
        match entry {
            Some(ip) if is_trusted(*ip, trusted) => client = *ip,
            Some(ip) => return (*ip, n + 1),
            None => return (client, n),
        }
    }
    (client, chain.len())
}

/// The `X-Forwarded-For` sent upstream: the believed part of the received chain (the
/// client first), then the peer. From an untrusted peer, the client-written chain is
/// dropped: the value is the peer alone.
pub fn forwarded_for(client: &Client, headers: &http::HeaderMap) -> Option<String> {
    let peer = client.peer?;
    if client.believed == 0 {
        return Some(peer.to_string());
    }
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let kept = &entries[entries.len().saturating_sub(client.believed)..];
    let mut out = String::with_capacity(64);
    for e in kept {
        out.push_str(e);
        out.push_str(", ");
    }
    out.push_str(&peer.to_string());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_client_is_the_right_most_untrusted_address() {
        let trusted = nets(&["10.0.0.0/8", "127.0.0.1/32"]);
        let chain: Vec<Option<IpAddr>> = ["203.0.113.9", "198.51.100.1", "10.1.1.1"]
            .iter()
            .map(|s| Some(ip(s)))
            .collect();
        assert_eq!(
            resolve(ip("127.0.0.1"), &chain, &trusted),
            (ip("198.51.100.1"), 2)
        );
        // Every hop trusted: the left-most is the client.
        let all: Vec<Option<IpAddr>> = vec![Some(ip("10.0.0.2")), Some(ip("10.0.0.3"))];
        assert_eq!(
            resolve(ip("127.0.0.1"), &all, &trusted),
            (ip("10.0.0.2"), 2)
        );
        // Garbage stops the walk at the last trusted hop.
        let bad = vec![Some(ip("203.0.113.9")), None, Some(ip("10.0.0.3"))];
        assert_eq!(
            resolve(ip("127.0.0.1"), &bad, &trusted),
            (ip("10.0.0.3"), 1)
        );
        assert_eq!(
            resolve(ip("127.0.0.1"), &[], &trusted),
            (ip("127.0.0.1"), 0)
        );
    }

    #[test]
    fn entries_with_ports_and_brackets_are_addresses() {
        assert_eq!(parse_entry("192.0.2.1:443"), Some(ip("192.0.2.1")));
        assert_eq!(parse_entry("[2001:db8::1]"), Some(ip("2001:db8::1")));
        assert_eq!(parse_entry("[2001:db8::1]:80"), Some(ip("2001:db8::1")));
        assert_eq!(parse_entry("unknown"), None);
        assert_eq!(parse_entry("::ffff:192.0.2.7"), Some(ip("192.0.2.7")));
    }

    #[test]
    fn the_forwarded_chain_starts_at_the_client() {
        let mut h = http::HeaderMap::new();
        h.append("x-forwarded-for", "1.1.1.1, 203.0.113.9".parse().unwrap());
        h.append("x-forwarded-for", "10.0.0.5".parse().unwrap());
        let mut c = Client {
            ip: Some(ip("203.0.113.9")),
            peer: Some(ip("127.0.0.1")),
            believed: 2,
            ..Client::default()
        };
        assert_eq!(
            forwarded_for(&c, &h).as_deref(),
            Some("203.0.113.9, 10.0.0.5, 127.0.0.1")
        );
        c.believed = 0;
        assert_eq!(forwarded_for(&c, &h).as_deref(), Some("127.0.0.1"));
    }
}
