//! fanout: an HTTP gateway on Pingora. One module per concern; `proxy` is the thin layer
//! of Pingora phases that delegates to the others, and `main.rs` only wires.

pub mod access_log;
pub mod admin;
pub mod broadcast;
pub mod cache;
pub mod cli;
pub mod client;
pub mod compress;
pub mod config;
pub mod demo;
pub mod edge;
pub mod fallback;
pub mod filters;
pub mod forwarding;
pub mod gateway;
pub mod keys;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod mirror;
pub mod outbound;
pub mod probe;
pub mod proxy;
pub mod ratelimit;
pub mod redirect;
pub mod reload;
pub mod request_id;
pub mod respond;
pub mod routing;
pub mod server;
pub mod service;
pub mod telemetry;
pub mod tls;
pub mod trace_context;
pub mod tunnel;
pub mod upstream;
