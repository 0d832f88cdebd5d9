//! `access:`: the client's address (after `trusted_proxies` and the PROXY protocol)
//! against the route's `deny` networks, then its `allow` networks (none: every address).

use async_trait::async_trait;
use ipnet::IpNet;
use pingora_proxy::Session;

use super::RequestFilter;
use crate::config::AccessList;
use crate::http::answer::{Reason, Stop};
use crate::http::passage::Passage;

pub struct Addresses {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl Addresses {
    pub fn new(list: &AccessList) -> Addresses {
        Addresses {
            allow: list.allow.clone(),
            deny: list.deny.clone(),
        }
    }

    /// Whether a client at `ip` may pass: not denied, and allowed (an empty `allow`
    /// allows all). A client without an address (a Unix socket) is allowed only when
    /// nothing is listed.
    pub fn admits(&self, ip: Option<std::net::IpAddr>) -> bool {
        match ip {
            Some(ip) => {
                !self.deny.iter().any(|n| n.contains(&ip))
                    && (self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip)))
            }
            None => self.allow.is_empty() && self.deny.is_empty(),
        }
    }
}

#[async_trait]
impl RequestFilter for Addresses {
    async fn request(&self, _session: &mut Session, pass: &mut Passage) -> Result<(), Stop> {
        if self.admits(pass.client.ip) {
            Ok(())
        } else {
            Err(Stop::denied(403, Reason::Address, "forbidden"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_comes_first_and_an_empty_allow_allows_all() {
        let nets = |l: &[&str]| l.iter().map(|n| n.parse().unwrap()).collect::<Vec<IpNet>>();
        let a = Addresses {
            allow: nets(&["10.0.0.0/8", "2001:db8::/32"]),
            deny: nets(&["10.66.0.0/16"]),
        };
        let ip = |s: &str| Some(s.parse().unwrap());
        assert!(a.admits(ip("10.1.2.3")));
        assert!(!a.admits(ip("10.66.1.1")));
        assert!(!a.admits(ip("192.0.2.1")));
        assert!(a.admits(ip("2001:db8::7")));
        assert!(!a.admits(ip("2001:db9::7")));
        let open = Addresses {
            allow: Vec::new(),
            deny: nets(&["192.0.2.0/24"]),
        };
        assert!(open.admits(ip("198.51.100.1")));
        assert!(!open.admits(ip("192.0.2.9")));
    }
}
