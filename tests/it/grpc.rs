//! gRPC's shape over h2 passes through: an h2c client, fanout with `http2: true`, an h2c
//! backend (`protocol: h2`) that answers with a body and trailers (`grpc-status`), which the
//! client receives; `TE: trailers` reaches the backend.

use std::convert::Infallible;
use std::time::Duration;

use crate::common::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

/// An h2c backend answering every request like a unary gRPC call: the request's body back,
/// then `grpc-status: 0` and `grpc-message: ok` as trailers (`grpc-status: 14`,
/// UNAVAILABLE, for a method whose name ends in `Fail`).
async fn grpc_backend() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: hyper::Request<Incoming>| async move {
                    let te = req.headers().get("te").cloned();
                    let code = match req.uri().path().ends_with("Fail") {
                        true => "14",
                        false => "0",
                    };
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", code.parse().unwrap());
                    trailers.insert("grpc-message", "ok".parse().unwrap());
                    let frames: Vec<Result<Frame<Bytes>, Infallible>> =
                        vec![Ok(Frame::data(body)), Ok(Frame::trailers(trailers))];
                    let stream = futures_util::stream::iter(frames);
                    Ok::<_, Infallible>(
                        hyper::Response::builder()
                            .header("content-type", "application/grpc")
                            .header(
                                "x-seen-te",
                                te.unwrap_or(http::HeaderValue::from_static("none")),
                            )
                            .body(StreamBody::new(stream))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// A gateway with `http2: true` in front of [`grpc_backend`] on `/pkg.Service/`.
async fn grpc_gateway() -> Gateway {
    let backend = grpc_backend().await;
    Gateway::start_listening(
        |port| format!("[{{ address: \"127.0.0.1:{port}\", http2: true }}]"),
        &format!(
            "upstreams:\n  grpc: {{ backends: [{backend}], protocol: h2 }}\n\
             routes:\n  - {{ match: {{ prefix: /pkg.Service/ }}, upstream: grpc }}\n"
        ),
    )
}

/// A unary call of `method` over h2c through `gw`.
async fn call(gw: &Gateway, method: &str, message: Bytes) -> hyper::Response<Incoming> {
    let tcp = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2c handshake");
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method("POST")
        .uri(format!("http://127.0.0.1:{}/pkg.Service/{method}", gw.port))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(message))
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("answer in time")
        .expect("answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_trailers_pass_through_h2() {
    let gw = grpc_gateway().await;
    let message = Bytes::from_static(b"\0\0\0\0\x05hello");
    let resp = call(&gw, "Call", message.clone()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    // `TE: trailers` is the one TE gRPC needs, and h2 allows it through (RFC 9113 §8.2.2).
    assert_eq!(resp.headers()["x-seen-te"], "trailers");
    let collected = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("body in time")
        .expect("body");
    let trailers = collected
        .trailers()
        .cloned()
        .expect("trailers reached the client");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "ok");
    assert_eq!(collected.to_bytes(), message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_records_the_grpc_status() {
    let gw = grpc_gateway().await;
    for method in ["Call", "Fail"] {
        let resp = call(&gw, method, Bytes::from_static(b"\0\0\0\0\x01x")).await;
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.expect("body");
    }
    for (path, code) in [("/pkg.Service/Call", 0), ("/pkg.Service/Fail", 14)] {
        let line = stdout_line(&gw, &format!("\"path\":\"{path}\"")).await;
        let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
        assert_eq!(v["status"], 200, "{line}");
        assert_eq!(v["grpc_status"], code, "{line}");
    }
}
