//! Wiring: a validated [`Config`] and the command line's process options become one Pingora
//! `Server` with its services — the proxy on every `listen` address, the admin listener,
//! and the health checker in the background.

use std::sync::Arc;
use std::time::Duration;

use pingora_core::apps::http_app::HttpServer;
use pingora_core::listeners::{ListenerConfig, TcpSocketOptions};
use pingora_core::protocols::l4::stream::L4BufferSettings;
use pingora_core::server::configuration::Opt;
use pingora_core::server::Server;
use pingora_core::services::background::background_service;
use pingora_core::services::listening::Service;
use pingora_core::services::ServiceWithDependents;

use crate::admin::history::{Sampler, Samples};
use crate::admin::AdminApp;
use crate::app::lifecycle::SignalWatch;
use crate::broadcast::disk::DiskSpool;
use crate::broadcast::redis::RedisSpool;
use crate::broadcast::spool::{MemorySpool, Spool};
use crate::broadcast::Deliverer;
use crate::config::Config;
use crate::config::{SpoolStore, MEMORY_SPOOL_MAX_SIZE};
use crate::edge::accept::{Edge, EdgeListener};
use crate::edge::bind::{Address, BindFirst};
use crate::edge::handshake::Terminator;
use crate::gateway::Gateway;
use crate::outbound::redis::RedisClient;
use crate::proxy::FanoutProxy;
use crate::reload::control::Control;
use crate::reload::{Hangup, Reloader};
use crate::upstream::discovery::Discovery;
use crate::upstream::health::HealthChecker;

/// The longest the first DNS lookups may hold the start up.
const DNS_AT_START: Duration = Duration::from_secs(5);

/// Process options from the command line (Pingora's `-d` and `-u`).
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessOptions {
    pub daemon: bool,
    pub upgrade: bool,
}

/// Said once every listener of the process is bound (the proxy's, the admin's and the
/// `extra` services'): on stdout for the demo's instructions, in the log otherwise.
pub enum Announcement {
    Print(String),
    Log(String),
}

/// The line that says the gateway serves, and where.
pub fn serving_line(config: &Config) -> String {
    let listeners: Vec<String> = config
        .listen
        .iter()
        .map(|l| match (&l.tls, l.http2) {
            (Some(_), _) => format!("https://{}", l.addr),
            (None, true) => format!("http://{} (h2c)", l.addr),
            (None, false) => format!("http://{}", l.addr),
        })
        .collect();
    let mut line = format!("serving on {}", listeners.join(", "));
    if let Some(admin) = &config.admin {
        line.push_str(&format!("; admin on http://{}", admin.address));
    }
    line
}

/// The service that says [`Announcement`]: it depends on every listening service, and
/// Pingora starts it only once they have reported ready (bound).
struct Announce(Option<Announcement>);

#[async_trait::async_trait]
impl pingora_core::services::background::BackgroundService for Announce {
    async fn start(&self, _: pingora_core::server::ShutdownWatch) {
        match &self.0 {
            Some(Announcement::Print(text)) => println!("{text}"),
            Some(Announcement::Log(text)) => log::info!("{text}"),
            None => {}
        }
    }
}

/// Where the configuration came from: its text, and the file a reload reads again (none
/// in quick mode and the demo).
#[derive(Debug, Default, Clone)]
pub struct ConfigSource {
    pub text: String,
    pub file: Option<std::path::PathBuf>,
}

/// The spool `spool:` asks for (the memory spool when there is none).
fn open_spool(config: &Config) -> Result<Arc<dyn Spool>, String> {
    let Some(c) = &config.spool else {
        return Ok(Arc::new(MemorySpool::new(MEMORY_SPOOL_MAX_SIZE)));
    };
    Ok(match &c.store {
        SpoolStore::Disk { dir, fsync } => Arc::new(
            DiskSpool::open(dir, c.max_size, *fsync)
                .map_err(|e| format!("spool.dir {}: {e}", dir.display()))?,
        ),
        SpoolStore::Memory => Arc::new(MemorySpool::new(c.max_size)),
        SpoolStore::Redis { claim_after } => {
            let redis = config
                .redis
                .as_ref()
                .ok_or("spool.store: redis needs a top-level `redis:` section")?;
            let client = Arc::new(RedisClient::new(redis)?);
            Arc::new(RedisSpool::new(client, c.max_size, *claim_after))
        }
    })
}

/// Builds the server and its services. Extra services (the demo's backends) ride along.
pub fn build(
    config: Config,
    source: ConfigSource,
    process: ProcessOptions,
    extra: Vec<Box<dyn ServiceWithDependents>>,
    announcement: Option<Announcement>,
) -> Result<(Server, Arc<Gateway>), String> {
    let opt = Opt {
        upgrade: process.upgrade,
        daemon: process.daemon,
        nocapture: false,
        test: false,
        conf: None,
    };
    let spool = open_spool(&config)?;
    if let crate::config::StateConfig::Disk { dir } = &config.state {
        crate::upstream::sticky::keep_key_in(dir)?;
    }
    let listen = config.listen.clone();
    let admin = config.admin.clone();
    let server_conf = config.server_copy()?;
    let resolver = config.resolver.clone();
    let control = crate::reload::control::socket_path(&config.server.upgrade_sock);
    let gateway = Arc::new(Gateway::new(config, &source.text, spool)?);
    let reloader = Arc::new(Reloader::new(Arc::clone(&gateway)));
    reloader.history.started(source.file);
    // Backends found by DNS are looked up before anything serves: no request may find
    // their upstream empty, not even the first after a graceful upgrade.
    let discovery = Discovery::new(resolver.as_ref(), &gateway.peek().upstreams)?
        .following(gateway.upstreams_watch());
    discovery.resolve_at_start(DNS_AT_START)?;
    let mut server = Server::new_with_opt_and_conf(opt, server_conf);
    server.bootstrap();

    let mut http = pingora_proxy::http_proxy(
        &server.configuration,
        FanoutProxy::new(Arc::clone(&gateway)),
    );
    let mut listeners = Vec::new();
    for l in &listen {
        let tls = match &l.tls {
            Some(t) => {
                let terminator = Arc::new(Terminator::new(crate::tls::server_config(
                    &t.certificates,
                    t.min_tls13,
                    l.http2,
                )?));
                gateway
                    .terminators
                    .lock()
                    .push((l.addr, Arc::clone(&terminator)));
                Some(terminator)
            }
            None => None,
        };
        let gauge = gateway
            .metrics
            .client_connections
            .with_label_values(&[&l.addr.to_string()]);
        listeners.push(EdgeListener {
            addr: l.addr,
            gauge,
            h2c: l.http2 && tls.is_none(),
            proxy_protocol: l.proxy_protocol,
            tls,
        });
    }
    let mut options = http.server_options.take().unwrap_or_default();
    // Pingora peeks for the preface; the edge hands it over only on h2c listeners.
    options.h2c = listeners.iter().any(|l| l.h2c);
    // An h2 connection without a stream is idle: it gets `keepalive_timeout`, as an
    // HTTP/1 connection between requests does.
    options.h2_idle_timeout = Some(gateway.clients.load().keepalive_timeout);
    http.server_options = Some(options);
    let edge = Edge::new(
        http,
        Arc::clone(&gateway.clients),
        Arc::clone(&gateway.connections),
        listeners,
    );
    let mut proxy = Service::new("fanout proxy".into(), edge);
    let mut addresses = Vec::new();
    for l in &listen {
        addresses.push(Address {
            addr: l.addr,
            v6_only: l.v6_only,
        });
        // No L4 read buffer: Pingora's 64 KiB default per connection is most of what an
        // idle or slow client costs, and the edge reads a head into a buffer of its own
        // size anyway (bench/RESULTS.md, memory per connection). TLS is the edge's too.
        let mut listener =
            ListenerConfig::tcp(l.addr.to_string()).l4_buffer(L4BufferSettings::default().read(0));
        if l.v6_only {
            // The IPv6 half of `:PORT`: IPv4 clients come in on the other socket, with
            // their own addresses rather than IPv4-mapped ones.
            let mut options = TcpSocketOptions::default();
            options.ipv6_only = Some(true);
            listener = listener.tcp_socket_options(options);
        }
        proxy.add_listener(listener);
    }
    let proxy = BindFirst::new(proxy, addresses, "listener", process.upgrade);
    let mut listening = vec![server.add_service(proxy)];

    if let Some(admin_config) = &admin {
        let history = Arc::new(Samples::new());
        let mut admin = Service::new(
            "fanout admin".into(),
            HttpServer::new_app(AdminApp::new(Arc::clone(&reloader), Arc::clone(&history))),
        );
        admin.add_tcp(&admin_config.address.to_string());
        let address = Address {
            addr: admin_config.address,
            v6_only: false,
        };
        let admin = BindFirst::new(admin, vec![address], "admin listener", process.upgrade);
        // `/health` and `/ready` answer only once the proxy's listeners are bound.
        let handle = server.add_service(admin);
        handle.add_dependency(&listening[0]);
        listening.push(handle);
        server.add_service(background_service(
            "dashboard history",
            Sampler::new(Arc::clone(&gateway), history),
        ));
    }
    server.add_service(background_service(
        "signal watch",
        SignalWatch::new(Arc::clone(&gateway.draining)),
    ));
    server.add_service(background_service(
        "reload on SIGHUP",
        Hangup::new(Arc::clone(&reloader)),
    ));
    server.add_service(background_service(
        "control socket",
        Control::new(Arc::clone(&reloader), control),
    ));
    server.add_service(background_service(
        "health checks",
        HealthChecker::new(gateway.upstreams_watch()),
    ));
    server.add_service(background_service("dns discovery", discovery));
    // Always there: a reload may bring the first broadcast route.
    let deliverer = Deliverer::new(
        Arc::clone(&gateway.spool),
        gateway.broadcast_watch(),
        &server.configuration,
        gateway.metrics.spool_bytes.clone(),
        gateway.metrics.spool_oldest.clone(),
    );
    server.add_service(background_service("broadcast delivery", deliverer));
    listening.extend(server.add_services(extra));
    let announce = server.add_service(background_service("announce", Announce(announcement)));
    announce.add_dependencies(&listening);
    Ok((server, gateway))
}
