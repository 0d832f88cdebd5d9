//! The span model of OpenTelemetry tracing (`tracing:`): what a sampled request did, as
//! spans a request records without waiting. The export over OTLP is [`super::otlp`]'s; this
//! file depends on nothing above it, so the upstreams, the copies and the proxy record spans
//! without knowing how they leave.
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
//! is full the span is dropped and counted.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use prometheus::IntCounter;
use tokio::sync::mpsc;

use crate::config::TracingConfig;
use crate::http::trace_context::{Trace, TraceParent};

/// The tracer in force (none without `tracing:`), replaced by a reload that changes it.
static CURRENT: ArcSwapOption<Tracer> = ArcSwapOption::const_empty();

/// The tracer in force, if any.
pub fn current() -> Option<Arc<Tracer>> {
    CURRENT.load_full()
}

/// Puts `tracer` in force (`None`: no tracing).
pub fn set_current(tracer: Option<Arc<Tracer>>) {
    CURRENT.store(tracer);
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
    /// Starts the exporter's thread on the other end of the queue, run by the first span
    /// (after Pingora daemonized: a thread started before the fork would not survive it).
    start: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    started: OnceLock<()>,
}

impl Tracer {
    /// A tracer for `config` whose finished spans go into `queue` (`dropped` counts those
    /// it cannot take); `start` starts whatever drains the queue, when the first span ends.
    pub fn new(
        config: &TracingConfig,
        queue: mpsc::Sender<SpanData>,
        dropped: IntCounter,
        start: Box<dyn FnOnce() + Send>,
    ) -> Tracer {
        Tracer {
            config: config.clone(),
            queue,
            dropped,
            start: Mutex::new(Some(start)),
            started: OnceLock::new(),
        }
    }

    pub fn config(&self) -> &TracingConfig {
        &self.config
    }

    /// Starts the exporter, once.
    fn start_exporter(&self) {
        self.started.get_or_init(|| {
            if let Some(start) = self.start.lock().take() {
                start();
            }
        });
    }

    /// Whether a request whose trace context is `parent` (`from_client`: sent by the
    /// client) is traced: the client's sampled flag, else `sample`.
    pub fn samples(&self, parent: &TraceParent, from_client: bool) -> bool {
        if from_client {
            parent.flags & 1 == 1
        } else {
            crate::http::request_id::unit_random() < self.config.sample
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
                span_id: crate::http::request_id::random_u64().max(1).to_be_bytes(),
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
    let parent = TraceParent::parse(
        stored
            .get(crate::http::trace_context::TRACEPARENT)?
            .as_bytes(),
    )?;
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
