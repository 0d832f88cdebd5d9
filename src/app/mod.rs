//! The process: the command line ([`cli`]), building and running the Pingora server with
//! every service ([`server`]), the built-in demonstration ([`demo`]), the signals that
//! mark the gateway draining ([`lifecycle`]) and `--health-check` ([`probe`]). `main.rs`
//! only calls into here.

pub mod cli;
pub mod demo;
pub mod lifecycle;
pub mod probe;
pub mod server;
