//! fanout: an HTTP gateway on Pingora. One module per concern; `proxy` is the thin layer
//! of Pingora phases that delegates to the others, and `main.rs` only wires.

pub(crate) mod admin;
pub mod app;
pub(crate) mod broadcast;
pub(crate) mod cache;
pub(crate) mod compress;
pub mod config;
pub mod edge;
pub(crate) mod fallback;
pub mod filters;
pub(crate) mod gateway;
pub mod http;
pub(crate) mod keys;
pub(crate) mod limits;
pub mod mirror;
pub(crate) mod observe;
pub(crate) mod outbound;
pub(crate) mod proxy;
pub(crate) mod ratelimit;
pub(crate) mod redirect;
pub(crate) mod reload;
pub mod rollout;
pub mod routing;
pub(crate) mod tls;
pub(crate) mod upstream;
