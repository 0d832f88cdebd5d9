//! Connection admission: the count of open client connections, in all and per client
//! address, against `clients.max_connections` and `clients.max_connections_per_ip`. A
//! connection admitted holds a [`Slot`] for as long as it is open; dropping it gives the
//! place back. [`super::accept`] admits, [`super::stream`] holds the slot.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use prometheus::IntGauge;

use crate::limits::Budget;

/// Shards of the per-address connection table.
const SHARDS: usize = 32;

/// Which connection limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// `clients.max_connections`
    Total,
    /// `clients.max_connections_per_ip`
    PerIp,
}

/// Open connections, in all and per client address.
pub struct Connections {
    /// All open connections, against `max_connections` (a reload may change the limits;
    /// connections already open stay).
    total: Budget,
    /// 0: no per-address limit (connections are then not counted per address).
    max_per_ip: AtomicUsize,
    per_ip: Vec<Mutex<HashMap<IpAddr, usize>>>,
}

impl Connections {
    pub fn new(max: usize, max_per_ip: usize) -> Arc<Connections> {
        Arc::new(Connections {
            total: Budget::new(max),
            max_per_ip: AtomicUsize::new(max_per_ip),
            per_ip: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        })
    }

    /// Applies reloaded limits to connections admitted from now on.
    pub fn set_limits(&self, max: usize, max_per_ip: usize) {
        self.total.set_max(max);
        self.max_per_ip.store(max_per_ip, Relaxed);
    }

    fn shard(&self, ip: &IpAddr) -> Option<&Mutex<HashMap<IpAddr, usize>>> {
        if self.per_ip.is_empty() {
            return None;
        }
        let h = crate::keys::stable_hash(&match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        });
        self.per_ip.get(h as usize % self.per_ip.len())
    }

    /// Takes a slot for a connection from `ip`, or says which limit refuses it.
    pub fn admit(
        self: &Arc<Self>,
        ip: Option<IpAddr>,
        gauge: Option<IntGauge>,
    ) -> Result<Slot, Over> {
        if !self.total.try_take(1) {
            return Err(Over::Total);
        }
        let max_per_ip = self.max_per_ip.load(Relaxed);
        let ip = ip.filter(|_| max_per_ip > 0);
        if let Some((ip, shard)) = ip.and_then(|ip| Some((ip, self.shard(&ip)?))) {
            let mut map = shard.lock();
            let n = map.entry(ip).or_insert(0);
            if *n >= max_per_ip {
                drop(map);
                self.total.give_back(1);
                return Err(Over::PerIp);
            }
            *n += 1;
        }
        if let Some(g) = &gauge {
            g.inc();
        }
        Ok(Slot {
            table: Arc::clone(self),
            ip,
            gauge,
        })
    }
}

/// One admitted connection; dropping it gives the slot back.
pub struct Slot {
    table: Arc<Connections>,
    ip: Option<IpAddr>,
    gauge: Option<IntGauge>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(g) = &self.gauge {
            g.dec();
        }
        self.table.total.give_back(1);
        if let Some(ip) = self.ip {
            if let Some(shard) = self.table.shard(&ip) {
                let mut map = shard.lock();
                if let Some(n) = map.get_mut(&ip) {
                    *n -= 1;
                    if *n == 0 {
                        map.remove(&ip);
                    }
                }
            }
        }
    }
}
