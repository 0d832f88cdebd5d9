//! fanout: an HTTP gateway on Pingora. One module per concern; `proxy` is the thin layer
//! of Pingora phases that delegates to the others, and `main.rs` only wires.

pub mod admin;
pub mod app;
pub mod broadcast;
pub mod cache;
pub mod compress;
pub mod config;
pub mod edge;
pub mod fallback;
pub mod filters;
pub mod gateway;
pub mod http;
pub mod keys;
pub mod limits;
pub mod mirror;
pub mod observe;
pub mod outbound;
pub mod proxy;
pub mod ratelimit;
pub mod redirect;
pub mod reload;
pub mod routing;
pub mod tls;
pub mod upstream;
