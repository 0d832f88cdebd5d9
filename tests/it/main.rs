//! The integration tests, one module per area, in one binary: each test starts real
//! `fanout` processes on loopback ports with real backends and clients ([`common`]). One
//! binary links Pingora once instead of once per area (see bench/RESULTS.md, `make test`).

mod common;

mod access;
mod admin;
mod balancing;
mod broadcast;
mod cache;
mod cache_rfc;
mod compare;
mod compress;
mod config_check;
mod dashboard;
mod discovery;
mod edge;
mod expect;
mod fallback;
mod first_hour;
mod fleet;
mod framing;
mod grpc;
mod h2_edge;
mod health;
mod mirror;
mod otel;
mod overload;
mod paths;
mod plugins;
mod quick_start;
mod reload;
mod resilience;
mod routing;
mod shared_limits;
mod spool;
mod steering;
mod tls;
mod trace;
mod upgrade;
mod websocket;
