//! HTTP helpers and the request types every feature shares, below all of them: what a
//! request carries through the proxy ([`passage`]), the answers the gateway gives itself
//! ([`answer`], [`respond`]), who the client is ([`client`]), request ids and W3C trace
//! context, the headers sent upstream ([`forwarding`]), header helpers ([`headers`]) and
//! the classification of proxy failures ([`errors`]). Nothing here knows routes' features.

pub mod answer;
pub mod client;
pub mod errors;
pub mod forwarding;
pub mod headers;
pub mod passage;
pub mod request_id;
pub mod respond;
pub mod trace_context;
