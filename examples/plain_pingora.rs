//! A plain Pingora 0.9 round-robin load balancer "written the obvious way" (the shape of
//! pingora-proxy's load_balancer example), used only by bench/run.py as a reference point:
//! the same run then shows what fanout's features cost on top of Pingora itself.
//!
//! Usage: plain_pingora LISTEN BACKEND [BACKEND...]

use std::sync::Arc;

use async_trait::async_trait;
use pingora::prelude::*;
use pingora_load_balancing::{selection::RoundRobin, LoadBalancer};

struct Lb(Arc<LoadBalancer<RoundRobin>>);

#[async_trait]
impl ProxyHttp for Lb {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let backend = self
            .0
            .select(b"", 256)
            .ok_or_else(|| Error::explain(ErrorType::HTTPStatus(503), "no backend"))?;
        Ok(Box::new(HttpPeer::new(backend, false, String::new())))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: plain_pingora LISTEN BACKEND [BACKEND...]");
        std::process::exit(2);
    }
    let conf = pingora_core::server::configuration::ServerConf {
        threads: std::env::var("THREADS")
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(1),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let lb = match LoadBalancer::try_from_iter(&args[2..]) {
        Ok(lb) => lb,
        Err(e) => {
            eprintln!("bad backend list: {e}");
            std::process::exit(2);
        }
    };
    let mut proxy = pingora_proxy::http_proxy_service(&server.configuration, Lb(Arc::new(lb)));
    proxy.add_tcp(&args[1]);
    server.add_service(proxy);
    server.run_forever();
}
