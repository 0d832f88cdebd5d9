//! One Pingora HTTPS listener (TLS 1.2 and 1.3, h2 and http/1.1 by ALPN, one worker) that
//! answers `ok` to every request, built with whichever TLS feature was chosen: the TLS
//! library candidates measured on equal terms by `bench/tls.py --candidates`.
//!
//! Usage: tlslib-bench ADDR CERT KEY

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::listeners::tls::TlsSettings;
use pingora::protocols::http::ServerSession;
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::listening::Service;

struct Answer;

#[async_trait]
impl ServeHttp for Answer {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let _ = session.read_request_body().await;
        Response::builder()
            .status(200)
            .header("content-length", "3")
            .body(b"ok\n".to_vec())
            .unwrap_or_default()
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, cert, key] = args.as_slice() else {
        eprintln!("usage: tlslib-bench ADDR CERT KEY");
        std::process::exit(2);
    };
    let conf = ServerConf {
        threads: 1,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut tls = match TlsSettings::intermediate(cert, key) {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("TLS settings: {e}");
            std::process::exit(1);
        }
    };
    tls.enable_h2();
    let mut service = Service::new("tls candidate".to_string(), Answer);
    service.add_tls_with_settings(addr, None, tls);
    server.add_service(service);
    server.run_forever();
}
