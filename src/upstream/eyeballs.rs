//! Connecting to a backend written by name (`localhost:8080`): the name stands for one
//! backend whatever it resolves to, and a connection tries its addresses as RFC 8305
//! ("Happy Eyeballs v2") says — families interleaved, IPv6 first, a new attempt started
//! every [`ATTEMPT_DELAY`] or as soon as the one before fails, the first to connect
//! winning and the others dropped. The address that connected last is tried first next
//! time, so a name whose IPv6 address refuses (`localhost` for an IPv4-only service)
//! costs one refused attempt, once.
//!
//! [`ResolvedAddresses`] lives in the backend's learned state (kept across reloads, updated in
//! place when DNS answers otherwise); [`Connector`] is the Pingora `L4Connect` its peers
//! carry, so requests, WebSocket tunnels and health checks all connect this way, and the
//! mirror's own lanes call [`ResolvedAddresses::connect`].

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::connectors::L4Connect;
use pingora_core::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora_core::protocols::l4::stream::Stream;
use pingora_error::{Error, ErrorType};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// RFC 8305 5: how long an attempt has before the next address is tried beside it.
pub(crate) const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// The addresses one backend's name resolved to last, and the one that connected last.
#[derive(Debug)]
pub struct ResolvedAddresses {
    all: ArcSwap<Vec<SocketAddr>>,
    last_good: parking_lot::Mutex<Option<SocketAddr>>,
}

impl ResolvedAddresses {
    pub fn new(all: Vec<SocketAddr>) -> ResolvedAddresses {
        ResolvedAddresses {
            all: ArcSwap::from_pointee(all),
            last_good: parking_lot::Mutex::new(None),
        }
    }

    /// What the name resolves to now.
    pub fn all(&self) -> Arc<Vec<SocketAddr>> {
        self.all.load_full()
    }

    /// DNS answered otherwise: later connections try these.
    pub fn set(&self, all: Vec<SocketAddr>) {
        self.all.store(Arc::new(all));
    }

    /// The order of attempts: the address that connected last (if still listed), then
    /// the rest with IPv6 and IPv4 taking turns, IPv6 first (RFC 8305 4).
    pub fn order(&self) -> Vec<SocketAddr> {
        let all = self.all();
        let first = (*self.last_good.lock()).filter(|a| all.contains(a));
        let (mut v6, mut v4): (Vec<SocketAddr>, Vec<SocketAddr>) = all
            .iter()
            .filter(|a| Some(**a) != first)
            .partition(|a| a.is_ipv6());
        v6.reverse();
        v4.reverse();
        let mut order: Vec<SocketAddr> = first.into_iter().collect();
        let mut six = true;
        loop {
            let next = match six {
                true => v6.pop().or_else(|| v4.pop()),
                false => v4.pop().or_else(|| v6.pop()),
            };
            let Some(a) = next else { break };
            order.push(a);
            six = !six;
        }
        order
    }

    /// Connects to the first address that answers, within `timeout` in all.
    pub async fn connect(&self, timeout: Duration) -> io::Result<TcpStream> {
        let order = self.order();
        let won = tokio::time::timeout(timeout, race(&order)).await;
        match won {
            Ok(Ok((stream, addr))) => {
                // TCP_NODELAY is the caller's: Pingora sets it on every connection, the
                // mirror's lanes on theirs.
                *self.last_good.lock() = Some(addr);
                Ok(stream)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no address answered within {timeout:?}"),
            )),
        }
    }
}

/// Tries `order` as RFC 8305 5 says: the next attempt starts when the one before fails
/// or after [`ATTEMPT_DELAY`], whichever comes first; the first connection wins, the
/// attempts still under way are dropped with the set.
async fn race(order: &[SocketAddr]) -> io::Result<(TcpStream, SocketAddr)> {
    let mut attempts = JoinSet::new();
    let mut next = order.iter().copied();
    let mut last_error = io::Error::new(io::ErrorKind::NotFound, "the name has no address");
    let start = |attempts: &mut JoinSet<_>, addr: SocketAddr| {
        attempts.spawn(async move { (addr, TcpStream::connect(addr).await) });
    };
    let Some(first) = next.next() else {
        return Err(last_error);
    };
    start(&mut attempts, first);
    let mut more = true;
    loop {
        tokio::select! {
            done = attempts.join_next() => match done {
                Some(Ok((addr, Ok(stream)))) => return Ok((stream, addr)),
                Some(Ok((addr, Err(e)))) => {
                    last_error = io::Error::new(e.kind(), format!("{addr}: {e}"));
                    match next.next() {
                        Some(a) => start(&mut attempts, a),
                        None if attempts.is_empty() => return Err(last_error),
                        None => more = false,
                    }
                }
                Some(Err(_)) => {}
                None => return Err(last_error),
            },
            _ = tokio::time::sleep(ATTEMPT_DELAY), if more => match next.next() {
                Some(a) => start(&mut attempts, a),
                None => more = false,
            },
        }
    }
}

/// The Pingora side: a backend's peers connect through this instead of to their one
/// address.
#[derive(Debug, Clone)]
pub struct Connector {
    pub addresses: Arc<ResolvedAddresses>,
    /// Pingora applies no `connection_timeout` to a custom connector: this is it.
    pub timeout: Duration,
}

#[async_trait]
impl L4Connect for Connector {
    async fn connect(&self, _addr: &PeerAddr) -> pingora_error::Result<Stream> {
        match self.addresses.connect(self.timeout).await {
            Ok(stream) => Ok(stream.into()),
            Err(e) => {
                let kind = match e.kind() {
                    io::ErrorKind::TimedOut => ErrorType::ConnectTimedout,
                    io::ErrorKind::ConnectionRefused => ErrorType::ConnectRefused,
                    _ => ErrorType::ConnectError,
                };
                Error::e_because(kind, "connecting to the backend's addresses", e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn families_take_turns_ipv6_first_and_the_last_good_address_leads() {
        let all = ResolvedAddresses::new(vec![
            a("127.0.0.1:80"),
            a("127.0.0.2:80"),
            a("[::1]:80"),
            a("[::2]:80"),
            a("127.0.0.3:80"),
        ]);
        assert_eq!(
            all.order(),
            [
                "[::1]:80",
                "127.0.0.1:80",
                "[::2]:80",
                "127.0.0.2:80",
                "127.0.0.3:80"
            ]
            .map(a)
        );
        *all.last_good.lock() = Some(a("127.0.0.2:80"));
        assert_eq!(all.order()[0], a("127.0.0.2:80"));
        assert_eq!(all.order().len(), 5);
        // An address DNS no longer gives is not tried first.
        all.set(vec![a("127.0.0.1:80")]);
        assert_eq!(all.order(), vec![a("127.0.0.1:80")]);
    }

    #[tokio::test]
    async fn a_refused_address_moves_on_at_once_and_the_winner_is_remembered() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live = listener.local_addr().unwrap();
        // A port nothing listens on: bound, then closed.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let all = ResolvedAddresses::new(vec![dead, live]);
        let started = std::time::Instant::now();
        let stream = all.connect(Duration::from_secs(5)).await.unwrap();
        assert_eq!(stream.peer_addr().unwrap(), live);
        assert!(started.elapsed() < ATTEMPT_DELAY, "{:?}", started.elapsed());
        assert_eq!(all.order()[0], live);
    }

    #[tokio::test]
    async fn no_address_connecting_is_an_error_naming_the_last() {
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let all = ResolvedAddresses::new(vec![dead]);
        let e = all.connect(Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        assert!(e.to_string().contains(&dead.to_string()), "{e}");
    }
}
