//! Listening sockets bound before anything says the gateway runs.
//!
//! Pingora binds a service's listeners inside the service's own thread, retries a busy
//! address for 30 s and then panics that thread while the rest of the process (the admin
//! listener's `/health` among it) lives on. [`BindFirst`] wraps a listening service: it
//! binds each of its addresses itself, at once, and puts the sockets into the table Pingora
//! takes inherited sockets from, so Pingora only adopts them. An address that cannot be
//! bound ends the process with one line naming the address and the reason. Only then does
//! the service report ready, so a service that depends on it (the admin listener on the
//! proxy's, the "running" line on both) starts after every socket is bound.

use std::net::SocketAddr;
use std::os::fd::IntoRawFd;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::server::{ListenFds, ShutdownWatch};
use pingora_core::services::listening::Service;
use pingora_core::services::{
    Service as ServiceTrait, ServiceReadyNotifier, ServiceWithDependents,
};

/// What Pingora asks of a listening socket (its own listeners use the same backlog).
const BACKLOG: i32 = 65535;

/// A graceful upgrade may start this process a moment before the old one has let go of an
/// address it does not hand over: a busy address is tried again for this long, then only.
const UPGRADE_RETRY: Duration = Duration::from_secs(2);

/// One address a service listens on.
#[derive(Debug, Clone)]
pub(crate) struct Address {
    pub addr: SocketAddr,
    /// The IPv6 half of `:PORT`, which leaves IPv4 to the other socket.
    pub v6_only: bool,
}

/// A listening service whose sockets are bound before it starts (see the module's text).
pub(crate) struct BindFirst<A> {
    service: Service<A>,
    addresses: Vec<Address>,
    /// What the service is, for the error line ("listener", "admin listener").
    role: &'static str,
    upgrade: bool,
}

impl<A> BindFirst<A> {
    pub(crate) fn new(
        service: Service<A>,
        addresses: Vec<Address>,
        role: &'static str,
        upgrade: bool,
    ) -> BindFirst<A> {
        BindFirst {
            service,
            addresses,
            role,
            upgrade,
        }
    }
}

/// Binds `address` as Pingora would (SO_REUSEADDR, the same backlog).
fn bind(address: &Address) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Socket, Type};
    let domain = Domain::for_address(address.addr);
    let socket = Socket::new(domain, Type::STREAM, None)?;
    // Pingora's runtime accepts on it: it must not block.
    socket.set_nonblocking(true)?;
    socket.set_reuse_address(true)?;
    if address.v6_only {
        socket.set_only_v6(true)?;
    }
    socket.bind(&address.addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket)
}

/// Binds every address not already in `table` (those came from the process before a
/// graceful upgrade) and records it there; the first that fails is returned with its error.
pub(crate) fn bind_all(
    addresses: &[Address],
    table: &ListenFds,
    upgrade: bool,
) -> Result<(), (SocketAddr, std::io::Error)> {
    for address in addresses {
        let key = address.addr.to_string();
        if table.lock().get(&key).is_some() {
            continue;
        }
        let deadline = std::time::Instant::now() + UPGRADE_RETRY;
        let socket = loop {
            match bind(address) {
                Ok(s) => break s,
                Err(e)
                    if upgrade
                        && e.kind() == std::io::ErrorKind::AddrInUse
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err((address.addr, e)),
            }
        };
        // Pingora takes the descriptor over when it adopts the socket from the table.
        table.lock().add(key, socket.into_raw_fd());
    }
    Ok(())
}

/// The reason in words a user acts on.
pub(crate) fn reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            "address already in use (another process listens there)".into()
        }
        std::io::ErrorKind::PermissionDenied => {
            "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)".into()
        }
        std::io::ErrorKind::AddrNotAvailable => {
            "address not available (no interface of this machine has it)".into()
        }
        _ => e.to_string(),
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServiceWithDependents for BindFirst<A> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
        ready: ServiceReadyNotifier,
    ) {
        let table = fds.unwrap_or_else(|| {
            std::sync::Arc::new(parking_lot::Mutex::new(pingora_core::server::Fds::new()))
        });
        if let Err((addr, e)) = bind_all(&self.addresses, &table, self.upgrade) {
            eprintln!(
                "fanout: cannot listen on {addr} ({}): {}",
                self.role,
                reason(&e)
            );
            // Nothing has been said to be running: the start ends here, whatever else
            // this process had begun.
            std::process::exit(1);
        }
        ready.notify_ready();
        ServiceTrait::start_service(&mut self.service, Some(table), shutdown, listeners_per_fd)
            .await
    }

    fn name(&self) -> &str {
        ServiceTrait::name(&self.service)
    }

    fn threads(&self) -> Option<usize> {
        ServiceTrait::threads(&self.service)
    }

    fn on_startup_delay(&self, _: Duration) {}

    fn listen_addresses(&self) -> Option<Vec<String>> {
        ServiceTrait::listen_addresses(&self.service)
    }
}
