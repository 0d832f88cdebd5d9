//! What the gateway sends on its own account, with no client session behind it: copies
//! and deliveries through Pingora's connector ([`exchange`]), the HTTP services it asks
//! (JWKS, forward auth, the OTLP collector: [`service`]) and its connections to Redis
//! ([`redis`]).

pub mod exchange;
pub mod redis;
pub mod service;
