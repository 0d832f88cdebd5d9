//! OpenTelemetry spans (`tracing:`), received by an OTLP/HTTP collector written here that
//! decodes the protobuf with the `opentelemetry-proto` types: parents, children and links
//! are right across attempts, mirror copies and broadcast deliveries made later; a
//! collector that is down or never answers costs requests nothing, and the queue's bound
//! holds.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, Span};
use prost::Message;

use crate::common::*;

/// A collector: every span of every export, and the service names it was told.
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
    services: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Collector {
    async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
        let services: Arc<Mutex<Vec<String>>> = Arc::default();
        let (s, n) = (Arc::clone(&spans), Arc::clone(&services));
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (s, n) = (Arc::clone(&s), Arc::clone(&n));
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (s, n) = (Arc::clone(&s), Arc::clone(&n));
                        async move {
                            let path = req.uri().path().to_string();
                            let body = req.into_body().collect().await.map(|b| b.to_bytes());
                            let decoded = body
                                .ok()
                                .and_then(|b| ExportTraceServiceRequest::decode(b).ok());
                            let status = match (path.as_str(), decoded) {
                                ("/v1/traces", Some(export)) => {
                                    for rs in export.resource_spans {
                                        for kv in
                                            rs.resource.map(|r| r.attributes).unwrap_or_default()
                                        {
                                            if kv.key == "service.name" {
                                                n.lock().unwrap().push(format!("{:?}", kv.value));
                                            }
                                        }
                                        for ss in rs.scope_spans {
                                            s.lock().unwrap().extend(ss.spans);
                                        }
                                    }
                                    200
                                }
                                _ => 400,
                            };
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(status)
                                    .header("content-type", "application/x-protobuf")
                                    .body(Full::new(Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Collector {
            addr,
            spans,
            services,
            task,
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits (at most 10 s) until `done` holds for the spans received.
    async fn until(&self, what: &str, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {spans:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr(s: &Span, key: &str) -> Option<String> {
    s.attributes.iter().find(|kv| kv.key == key).map(|kv| {
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
            Some(Value::StringValue(s)) => s.clone(),
            Some(Value::IntValue(n)) => n.to_string(),
            other => format!("{other:?}"),
        }
    })
}

fn named<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn sent_traceparent(b: &Backend) -> String {
    let seen = b.seen();
    let last = seen.last().expect("a request reached the backend");
    last.headers["traceparent"].to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traced_request_has_its_attempt_and_mirror_copy_as_children() {
    let collector = Collector::start().await;
    let (primary, shadow) = (Backend::start("p").await, Backend::start("s").await);
    let gw = Gateway::start(&format!(
        "tracing: {{ otlp: \"http://{}\", sample: 0, service_name: edge-1 }}\n\
         upstreams:\n  main: {{ backends: [{}] }}\n  shadow: {{ backends: [{}] }}\n\
         routes:\n  - name: api\n    match: {{ prefix: / }}\n    upstream: main\n    mirror: [{{ upstream: shadow }}]\n",
        collector.addr, primary.addr, shadow.addr
    ));
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    // Sampled by the client: followed although `sample` is 0.
    let resp = client()
        .get(gw.url("/items/7"))
        .header("traceparent", format!("00-{trace}-{client_span}-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let spans = collector
        .until("the request, its attempt and its mirror copy", |s| {
            !named(s, "GET api").is_empty()
                && !named(s, "upstream attempt").is_empty()
                && !named(s, "mirror copy").is_empty()
        })
        .await;
    let request = named(&spans, "GET api")[0];
    assert_eq!(hex(&request.trace_id), trace);
    assert_eq!(hex(&request.parent_span_id), client_span);
    assert_eq!(request.kind, SpanKind::Server as i32);
    assert_eq!(
        attr(request, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(attr(request, "url.path").as_deref(), Some("/items/7"));
    assert_eq!(
        attr(request, "client.address").as_deref(),
        Some("127.0.0.1")
    );
    let attempt = named(&spans, "upstream attempt")[0];
    assert_eq!(attempt.trace_id, request.trace_id);
    assert_eq!(attempt.parent_span_id, request.span_id);
    assert_eq!(attempt.kind, SpanKind::Client as i32);
    assert_eq!(attr(attempt, "fanout.upstream").as_deref(), Some("main"));
    assert_eq!(
        attr(attempt, "server.address"),
        Some(primary.addr.to_string())
    );
    assert_eq!(attr(attempt, "fanout.attempt").as_deref(), Some("1"));
    let copy = named(&spans, "mirror copy")[0];
    assert_eq!(copy.trace_id, request.trace_id);
    assert_eq!(copy.parent_span_id, request.span_id);
    assert_eq!(copy.links.len(), 1);
    assert_eq!(copy.links[0].span_id, request.span_id);
    assert_eq!(attr(copy, "fanout.upstream").as_deref(), Some("shadow"));
    // What each upstream got names the span that sent it.
    assert_eq!(
        sent_traceparent(&primary),
        format!("00-{trace}-{}-01", hex(&attempt.span_id))
    );
    assert_eq!(
        sent_traceparent(&shadow),
        format!("00-{trace}-{}-01", hex(&copy.span_id))
    );
    let services = collector.services.lock().unwrap().clone();
    assert!(
        services.iter().all(|s| s.contains("edge-1")),
        "{services:?}"
    );
    let exported = "fanout_tracing_spans_total{outcome=\"exported\"}";
    let (c, g) = (client(), &gw);
    let c = &c;
    eventually(
        Duration::from_secs(5),
        "the export counted",
        || async move { metric(c, g, exported).await >= 3 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_and_its_later_deliveries_share_one_trace() {
    let collector = Collector::start().await;
    let target = Backend::start("t").await;
    target.set_status(503);
    let gw = Gateway::start(&format!(
        "tracing: {{ otlp: \"http://{}\", sample: 1.0 }}\n\
         upstreams:\n  audit: {{ backends: [{}] }}\n\
         routes:\n  - name: events\n    match: {{ prefix: /events }}\n    broadcast: [audit]\n",
        collector.addr, target.addr
    ));
    let resp = client()
        .post(gw.url("/events/e1"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    // The first delivery fails; once the target recovers a retry succeeds.
    let t = &target;
    eventually(
        Duration::from_secs(10),
        "a failed delivery",
        || async move { t.hits() >= 1 },
    )
    .await;
    target.set_status(200);
    let spans = collector
        .until("the request and a failed and a successful delivery", |s| {
            let deliveries = named(s, "broadcast delivery");
            !named(s, "POST events").is_empty()
                && deliveries
                    .iter()
                    .any(|d| attr(d, "http.response.status_code").as_deref() == Some("503"))
                && deliveries
                    .iter()
                    .any(|d| attr(d, "http.response.status_code").as_deref() == Some("200"))
        })
        .await;
    let request = named(&spans, "POST events")[0];
    assert!(
        request.parent_span_id.is_empty(),
        "a new trace starts at the request"
    );
    assert_eq!(
        attr(request, "http.response.status_code").as_deref(),
        Some("202")
    );
    for d in named(&spans, "broadcast delivery") {
        assert_eq!(d.trace_id, request.trace_id);
        assert_eq!(d.parent_span_id, request.span_id);
        assert_eq!(d.links.first().map(|l| &l.span_id), Some(&request.span_id));
    }
    let failed = named(&spans, "broadcast delivery")
        .into_iter()
        .find(|d| attr(d, "http.response.status_code").as_deref() == Some("503"))
        .unwrap();
    assert_eq!(
        failed.status.as_ref().map(|s| s.code),
        Some(opentelemetry_proto::tonic::trace::v1::status::StatusCode::Error as i32)
    );
    // The target got the trace with the delivery's own span as its parent.
    let sent = sent_traceparent(&target);
    assert!(
        sent.starts_with(&format!("00-{}-", hex(&request.trace_id))),
        "{sent}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_or_dead_collector_costs_requests_nothing_and_the_queue_holds() {
    let b = Backend::start("b").await;
    let (silent, _) = silent_listener().await;
    let c = client();
    for (otlp, outcome) in [
        (format!("http://{silent}"), "dropped"),
        (format!("http://127.0.0.1:{}", free_port()), "failed"),
    ] {
        let gw = Gateway::start(&format!(
            "tracing: {{ otlp: \"{otlp}\", sample: 1.0, max_queue: 16 }}\n\
             upstreams:\n  u: {{ backends: [{}] }}\n\
             routes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
            b.addr
        ));
        let series = format!("fanout_tracing_spans_total{{outcome=\"{outcome}\"}}");
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut slowest = Duration::ZERO;
        let mut sent = 0;
        while metric(&c, &gw, &series).await == 0 {
            assert!(
                Instant::now() < deadline,
                "no span was {outcome} after {sent} requests"
            );
            for _ in 0..50 {
                let started = Instant::now();
                assert_eq!(get(&c, &gw.url("/x")).await.0, 200);
                slowest = slowest.max(started.elapsed());
                sent += 1;
            }
        }
        assert!(
            slowest < Duration::from_millis(500),
            "a request took {slowest:?} with the collector at {otlp}"
        );
        if outcome == "dropped" {
            // Nothing was exported, and what waits is bounded: the queue's 16 and one
            // batch of at most 512 stuck in the export.
            let exported =
                metric(&c, &gw, "fanout_tracing_spans_total{outcome=\"exported\"}").await;
            assert_eq!(exported, 0);
        }
    }
}
