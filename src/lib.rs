//! fanout: an HTTP gateway on Pingora. One module per concern; `proxy` is the thin layer
//! of Pingora phases that delegates to the others, and `main.rs` only wires.

pub mod admin;
pub mod broadcast;
pub mod cache;
pub mod cli;
pub mod compress;
pub mod config;
pub mod demo;
pub mod edge;
pub mod fallback;
pub mod filters;
pub mod gateway;
pub mod http;
pub mod keys;
pub mod lifecycle;
pub mod limits;
pub mod mirror;
pub mod observe;
pub mod outbound;
pub mod probe;
pub mod proxy;
pub mod ratelimit;
pub mod redirect;
pub mod redis_client;
pub mod reload;
pub mod routing;
pub mod server;
pub mod service;
pub mod tls;
pub mod tunnel;
pub mod upstream;
