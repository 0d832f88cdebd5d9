//! What the gateway tells about itself: Prometheus metrics ([`metrics`]), the JSON access
//! log ([`access_log`]) and OpenTelemetry tracing, split into the span model requests
//! record ([`span`], depending on nothing above it) and its export over OTLP ([`otlp`]).

pub mod access_log;
pub mod metrics;
pub mod otlp;
pub mod span;
