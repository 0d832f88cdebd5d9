//! OpenTelemetry spans (`tracing:`): what a sampled request did, exported over OTLP/HTTP
//! (protobuf) to a collector.
//!
//! A sampled request has a server span (method and route, status, bytes, client address);
//! under it a span per upstream attempt (backend, attempt number, outcome), the route's
//! filters (their verdict) and the cache lookup. Each mirror copy, fallback copy and
//! broadcast delivery attempt is a span of its own in the same trace, a child of the
//! request's span and linked to it, with its outcome: a delivery retried an hour later
//! still joins its trace, because the spool keeps the `traceparent` that names the request's
//! span. Sampling is parent-based: a client's sampled `traceparent` is followed, an unsampled
//! one too; a new trace is sampled with probability `sample`.
//!
//! Recording never waits: a finished span goes into a bounded queue (`max_queue`); when it
//! is full the span is dropped and counted. One thread of its own drains the queue every
//! 100 ms (never parked on it: a queued span wakes no thread) and exports in batches (up
//! to 512 spans, or what came within a second), encodes them with the
//! `opentelemetry-proto` types and POSTs them to `<otlp>/v1/traces` through a connector of
//! its own. A collector that is down or slow costs requests nothing; its failures are
//! counted (`fanout_tracing_spans_total{outcome}`) and logged at most once a minute.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span, status, ResourceSpans, ScopeSpans, Status};
use parking_lot::Mutex;
use prometheus::IntCounter;
use prost::Message;
use tokio::sync::mpsc;

use crate::config::TracingConfig;
use crate::metrics::Metrics;
use crate::trace_context::{Trace, TraceParent};

/// Spans sent in one export request at most.
const BATCH: usize = 512;
/// How often the exporter takes what the queue holds.
const DRAIN_EVERY: Duration = Duration::from_millis(100);
/// The longest a finished span waits for its batch.
const BATCH_WAIT: Duration = Duration::from_secs(1);

/// The tracer in force (none without `tracing:`), replaced by a reload that changes it.
static CURRENT: ArcSwapOption<Tracer> = ArcSwapOption::const_empty();

/// The tracer in force, if any.
pub fn current() -> Option<Arc<Tracer>> {
    CURRENT.load_full()
}

/// Puts `config`'s tracer in force (keeping the running one when the configuration is the
/// same), or none.
pub fn install(config: Option<&TracingConfig>, metrics: &Arc<Metrics>) {
    let running = CURRENT.load_full();
    match (config, running) {
        (None, None) => {}
        (Some(c), Some(t)) if t.config == *c => {}
        (None, Some(_)) => CURRENT.store(None),
        (Some(c), _) => CURRENT.store(Some(Arc::new(Tracer::new(c, metrics)))),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Server,
    Client,
    Internal,
}

/// An attribute's value.
#[derive(Debug, Clone)]
pub enum Value {
    Str(Cow<'static, str>),
    Int(i64),
}

impl From<&'static str> for Value {
    fn from(s: &'static str) -> Value {
        Value::Str(Cow::Borrowed(s))
    }
}
impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Str(Cow::Owned(s))
    }
}
impl From<i64> for Value {
    fn from(n: i64) -> Value {
        Value::Int(n)
    }
}

/// A finished span, as recorded (converted to the protocol's form by the exporter).
#[derive(Debug)]
pub struct SpanData {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub name: Cow<'static, str>,
    pub kind: Kind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Value)>,
    /// Set when the operation failed: its description.
    pub error: Option<String>,
    /// The request span a copy or delivery was made for.
    pub link: Option<([u8; 16], [u8; 8])>,
}

/// A span being recorded: finished (and queued for export) when dropped.
pub struct Span {
    data: Option<SpanData>,
    tracer: Arc<Tracer>,
}

impl Span {
    pub fn trace_id(&self) -> [u8; 16] {
        self.data.as_ref().map_or([0; 16], |d| d.trace_id)
    }

    pub fn span_id(&self) -> [u8; 8] {
        self.data.as_ref().map_or([0; 8], |d| d.span_id)
    }

    /// The `traceparent` naming this span as the parent of what it sends.
    pub fn traceparent(&self) -> TraceParent {
        TraceParent {
            trace_id: self.trace_id(),
            parent_id: self.span_id(),
            flags: 1,
        }
    }

    pub fn attr(&mut self, key: &'static str, value: impl Into<Value>) {
        if let Some(d) = &mut self.data {
            d.attributes.push((key, value.into()));
        }
    }

    pub fn rename(&mut self, name: impl Into<Cow<'static, str>>) {
        if let Some(d) = &mut self.data {
            d.name = name.into();
        }
    }

    pub fn fail(&mut self, why: impl Into<String>) {
        if let Some(d) = &mut self.data {
            d.error = Some(why.into());
        }
    }

    /// A span under this one, started now.
    pub fn child(&self, name: impl Into<Cow<'static, str>>, kind: Kind) -> Span {
        self.tracer.span(self.traceparent(), true, name, kind, None)
    }

    /// A span under this one for a copy made on its account (mirror, fallback), linked
    /// to it.
    pub fn copy(&self, name: impl Into<Cow<'static, str>>) -> Span {
        let parent = self.traceparent();
        self.tracer.span(
            parent,
            true,
            name,
            Kind::Client,
            Some((parent.trace_id, parent.parent_id)),
        )
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(mut data) = self.data.take() {
            data.end = SystemTime::now();
            self.tracer.record(data);
        }
    }
}

pub struct Tracer {
    config: TracingConfig,
    queue: mpsc::Sender<SpanData>,
    dropped: IntCounter,
    /// The exporter and its end of the queue, until the first span starts its thread
    /// (after Pingora daemonized: a thread started before the fork would not survive it).
    exporter: Mutex<Option<(Exporter, mpsc::Receiver<SpanData>)>>,
    started: OnceLock<()>,
}

impl Tracer {
    fn new(config: &TracingConfig, metrics: &Arc<Metrics>) -> Tracer {
        let (queue, rx) = mpsc::channel(config.max_queue.max(1));
        let outcome = |o: &str| metrics.tracing_spans.with_label_values(&[o]);
        let exporter = Exporter {
            service: crate::service::Service::standalone(&config.collector, metrics),
            resource: resource(&config.service_name),
            exported: outcome("exported"),
            failed: outcome("failed"),
            last_complaint: None,
        };
        Tracer {
            config: config.clone(),
            queue,
            dropped: outcome("dropped"),
            exporter: Mutex::new(Some((exporter, rx))),
            started: OnceLock::new(),
        }
    }

    /// Starts the exporter's thread, once.
    fn start_exporter(&self) {
        self.started.get_or_init(|| {
            if let Some((exporter, rx)) = self.exporter.lock().take() {
                let spawned = std::thread::Builder::new()
                    .name("fanout-otlp".into())
                    .spawn(move || exporter.run(rx));
                if let Err(e) = spawned {
                    log::error!("tracing: cannot start the exporter: {e}");
                }
            }
        });
    }

    /// Whether a request whose trace context is `parent` (`from_client`: sent by the
    /// client) is traced: the client's sampled flag, else `sample`.
    pub fn samples(&self, parent: &TraceParent, from_client: bool) -> bool {
        if from_client {
            parent.flags & 1 == 1
        } else {
            crate::request_id::unit_random() < self.config.sample
        }
    }

    /// A span started now in `parent`'s trace; `child`: under `parent.parent_id`, else a
    /// root (a new trace that the client did not send).
    pub fn span(
        self: &Arc<Self>,
        parent: TraceParent,
        child: bool,
        name: impl Into<Cow<'static, str>>,
        kind: Kind,
        link: Option<([u8; 16], [u8; 8])>,
    ) -> Span {
        Span {
            data: Some(SpanData {
                trace_id: parent.trace_id,
                span_id: crate::request_id::random_u64().max(1).to_be_bytes(),
                parent: child.then_some(parent.parent_id),
                name: name.into(),
                kind,
                start: SystemTime::now(),
                end: SystemTime::now(),
                attributes: Vec::new(),
                error: None,
                link,
            }),
            tracer: Arc::clone(self),
        }
    }

    fn record(&self, span: SpanData) {
        self.start_exporter();
        if self.queue.try_send(span).is_err() {
            self.dropped.inc();
        }
    }
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
            Kind::Server => span::SpanKind::Server,
            Kind::Client => span::SpanKind::Client,
            Kind::Internal => span::SpanKind::Internal,
        } as i32,
        start_time_unix_nano: nanos(s.start),
        end_time_unix_nano: nanos(s.end),
        attributes: s.attributes.iter().map(|(k, v)| kv(k, v)).collect(),
        links: s
            .link
            .map(|(trace_id, span_id)| span::Link {
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
    service: crate::service::Service,
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

/// The span of a copy (mirror, fallback) of a traced request: in its trace, under its
/// span and linked to it. `None` when the request is not traced.
pub fn copy_span(trace: &Trace, name: impl Into<Cow<'static, str>>) -> Option<Span> {
    let request = trace.span?;
    let tracer = current()?;
    let parent = TraceParent {
        trace_id: trace.parent.trace_id,
        parent_id: request,
        flags: 1,
    };
    Some(tracer.span(
        parent,
        true,
        name,
        Kind::Client,
        Some((parent.trace_id, request)),
    ))
}

/// The span of a broadcast delivery attempt, from the `traceparent` stored with the
/// request (it names the request's span when the request was traced): under that span
/// and linked to it. `None` when the request was not traced.
pub fn delivery_span(stored: &http::HeaderMap, name: impl Into<Cow<'static, str>>) -> Option<Span> {
    let parent = TraceParent::parse(stored.get(crate::trace_context::TRACEPARENT)?.as_bytes())?;
    if parent.flags & 1 == 0 {
        return None;
    }
    let tracer = current()?;
    Some(tracer.span(
        parent,
        true,
        name,
        Kind::Client,
        Some((parent.trace_id, parent.parent_id)),
    ))
}
