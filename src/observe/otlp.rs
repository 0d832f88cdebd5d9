//! The export of finished spans over OTLP/HTTP (protobuf) to a collector. One thread of
//! its own drains the tracer's queue every 100 ms (never parked on it: a queued span wakes
//! no thread) and exports in batches (up to 512 spans, or what came within a second),
//! encoded with the `opentelemetry-proto` types and POSTed to `<otlp>/v1/traces` through a
//! connector of its own. A collector that is down or slow costs requests nothing; its
//! failures are counted (`fanout_tracing_spans_total{outcome}`) and logged at most once a
//! minute.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span as proto, status, ResourceSpans, ScopeSpans, Status,
};
use prometheus::IntCounter;
use prost::Message;
use tokio::sync::mpsc;

use super::metrics::Metrics;
use super::span::{self, Kind, SpanData, Tracer, Value};
use crate::config::TracingConfig;

/// Spans sent in one export request at most.
const BATCH: usize = 512;
/// How often the exporter takes what the queue holds.
const DRAIN_EVERY: Duration = Duration::from_millis(100);
/// The longest a finished span waits for its batch.
const BATCH_WAIT: Duration = Duration::from_secs(1);

/// Puts `config`'s tracer in force (keeping the running one when the configuration is the
/// same), or none.
pub fn install(config: Option<&TracingConfig>, metrics: &Arc<Metrics>) {
    let running = span::current();
    match (config, running) {
        (None, None) => {}
        (Some(c), Some(t)) if t.config() == c => {}
        (None, Some(_)) => span::set_current(None),
        (Some(c), _) => span::set_current(Some(Arc::new(tracer(c, metrics)))),
    }
}

/// The tracer of `config`, its spans exported by an [`Exporter`] on a thread of its own.
fn tracer(config: &TracingConfig, metrics: &Arc<Metrics>) -> Tracer {
    let (queue, rx) = mpsc::channel(config.max_queue.max(1));
    let outcome = |o: &str| metrics.tracing_spans.with_label_values(&[o]);
    let exporter = Exporter {
        service: crate::outbound::service::Service::standalone(&config.collector, metrics),
        resource: resource(&config.service_name),
        exported: outcome("exported"),
        failed: outcome("failed"),
        last_complaint: None,
    };
    let start = Box::new(move || {
        let spawned = std::thread::Builder::new()
            .name("fanout-otlp".into())
            .spawn(move || exporter.run(rx));
        if let Err(e) = spawned {
            log::error!("tracing: cannot start the exporter: {e}");
        }
    });
    Tracer::new(config, queue, outcome("dropped"), start)
}

fn resource(service_name: &str) -> Resource {
    Resource {
        attributes: vec![kv("service.name", &Value::from(service_name.to_string()))],
        ..Default::default()
    }
}

fn kv(key: &str, value: &Value) -> KeyValue {
    let value = match value {
        Value::Str(s) => any_value::Value::StringValue(s.to_string()),
        Value::Int(n) => any_value::Value::IntValue(*n),
    };
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// One span in the protocol's form.
fn encode(s: SpanData) -> opentelemetry_proto::tonic::trace::v1::Span {
    use opentelemetry_proto::tonic::trace::v1::Span as Proto;
    Proto {
        trace_id: s.trace_id.to_vec(),
        span_id: s.span_id.to_vec(),
        parent_span_id: s.parent.map(|p| p.to_vec()).unwrap_or_default(),
        name: s.name.into_owned(),
        kind: match s.kind {
            Kind::Server => proto::SpanKind::Server,
            Kind::Client => proto::SpanKind::Client,
            Kind::Internal => proto::SpanKind::Internal,
        } as i32,
        start_time_unix_nano: nanos(s.start),
        end_time_unix_nano: nanos(s.end),
        attributes: s.attributes.iter().map(|(k, v)| kv(k, v)).collect(),
        links: s
            .link
            .map(|(trace_id, span_id)| proto::Link {
                trace_id: trace_id.to_vec(),
                span_id: span_id.to_vec(),
                ..Default::default()
            })
            .into_iter()
            .collect(),
        status: Some(match s.error {
            Some(message) => Status {
                message,
                code: status::StatusCode::Error as i32,
            },
            None => Status::default(),
        }),
        ..Default::default()
    }
}

struct Exporter {
    service: crate::outbound::service::Service,
    resource: Resource,
    exported: IntCounter,
    failed: IntCounter,
    last_complaint: Option<Instant>,
}

impl Exporter {
    fn run(mut self, mut rx: mpsc::Receiver<SpanData>) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                log::error!("tracing: no runtime for the exporter: {e}");
                return;
            }
        };
        rt.block_on(async move {
            // The queue is drained on a clock, never awaited: a span queued finds no
            // parked receiver to wake, so recording one costs a request no system call.
            let mut tick = tokio::time::interval(DRAIN_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut pending: Vec<SpanData> = Vec::new();
            let mut last_export = Instant::now();
            loop {
                tick.tick().await;
                let mut closed = false;
                loop {
                    match rx.try_recv() {
                        Ok(span) => pending.push(span),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            closed = true;
                            break;
                        }
                    }
                    if pending.len() >= BATCH {
                        self.export(std::mem::take(&mut pending)).await;
                        last_export = Instant::now();
                    }
                }
                let due = last_export.elapsed() >= BATCH_WAIT || closed;
                if !pending.is_empty() && due {
                    self.export(std::mem::take(&mut pending)).await;
                    last_export = Instant::now();
                }
                if closed {
                    // The tracer was replaced or is gone, and its queue is drained.
                    return;
                }
            }
        });
    }

    async fn export(&mut self, batch: Vec<SpanData>) {
        let n = batch.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "fanout".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans: batch.into_iter().map(encode).collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let body = Bytes::from(request.encode_to_vec());
        let headers = [(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/x-protobuf"),
        )];
        let answer = self
            .service
            .send(
                http::Method::POST,
                &headers,
                body,
                crate::config::TRACING_EXPORT_TIMEOUT,
                64 * 1024,
            )
            .await;
        match answer {
            Ok((head, _)) if head.status.is_success() => self.exported.inc_by(n),
            Ok((head, _)) => self.complain(n, format!("answered {}", head.status.as_u16())),
            Err(e) => self.complain(n, e.to_string()),
        }
    }

    fn complain(&mut self, n: u64, why: String) {
        self.failed.inc_by(n);
        let now = Instant::now();
        if self
            .last_complaint
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
        {
            self.last_complaint = Some(now);
            log::warn!(
                "tracing: {n} spans not exported to {}: {why}",
                self.service.url
            );
        }
    }
}
