//! What a reload in place cannot change: the differences between two configurations that
//! need a graceful upgrade (a new process), one line each.

use super::Config;

/// The changes from `old` to `new` that a running process cannot make, one line each.
pub fn needs_upgrade(old: &Config, new: &Config, cache_made: bool) -> Vec<String> {
    let mut lines = Vec::new();
    let shape = |c: &Config| -> Vec<String> {
        c.listen
            .iter()
            .map(|l| {
                let kind = match (&l.tls, l.http2) {
                    (Some(_), _) => "tls",
                    (None, true) => "h2c",
                    (None, false) => "http",
                };
                format!(
                    "{} {kind}{}",
                    l.addr,
                    if l.v6_only { " v6only" } else { "" }
                )
            })
            .collect()
    };
    let (was, now) = (shape(old), shape(new));
    if was != now {
        lines.push(format!(
            "listen: the listeners change ({} -> {})",
            was.join(", "),
            now.join(", ")
        ));
    }
    if old.server != new.server {
        lines.push("server: Pingora's process settings change".into());
    }
    if old.admin.as_ref().map(|a| a.address) != new.admin.as_ref().map(|a| a.address) {
        lines.push("admin: the admin listener's address changes".into());
    }
    if old.state != new.state {
        lines.push("state: where durable state is kept changes".into());
    }
    if old.spool != new.spool {
        lines.push("spool: the spool's settings change".into());
    } else if matches!(
        new.spool.as_ref().map(|s| &s.store),
        Some(crate::config::SpoolStore::Redis { .. })
    ) && old.redis != new.redis
    {
        lines.push("redis: the Redis the spool is in changes".into());
    }
    if old.resolver != new.resolver {
        lines.push("resolver: the DNS resolver's settings change".into());
    }
    if cache_made && old.cache_max_size != new.cache_max_size {
        lines.push("cache.max_size: the cache's size changes".into());
    }
    lines
}
