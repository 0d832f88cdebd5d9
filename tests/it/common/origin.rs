//! An origin whose every answer a test decides from the request (a JWKS server, an auth
//! service, an origin with exact caching headers), counting the requests it gets.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// A small HTTP/1.1 server whose answers `handle` decides (status, headers, body),
/// after `delay`; counts its requests.
pub struct Origin {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

pub type Handler =
    Arc<dyn Fn(&http::request::Parts) -> (u16, Vec<(String, String)>, String) + Send + Sync>;

impl Origin {
    pub async fn start(handle: Handler, delay: Duration) -> Origin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&hits);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (handle, hits) = (Arc::clone(&handle), Arc::clone(&counted));
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (handle, hits) = (Arc::clone(&handle), Arc::clone(&hits));
                        async move {
                            hits.fetch_add(1, SeqCst);
                            let (parts, _) = req.into_parts();
                            tokio::time::sleep(delay).await;
                            let (status, headers, body) = handle(&parts);
                            let mut resp = Response::builder().status(status);
                            for (k, v) in headers {
                                resp = resp.header(k, v);
                            }
                            Ok::<_, Infallible>(resp.body(Full::new(Bytes::from(body))).unwrap())
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Origin { addr, hits, task }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(SeqCst)
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}
