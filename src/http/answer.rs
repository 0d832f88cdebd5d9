//! An answer the gateway gives itself instead of letting a request on (a filter's
//! refusal, a preflight, a redirect), and why a request was refused (the `reason` label of
//! `fanout_access_denied_total`).

use bytes::Bytes;
use http::{HeaderName, HeaderValue};

/// Why a request was refused (`fanout_access_denied_total`'s `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `access` refused the client's address.
    Address,
    /// No credential, or a wrong one.
    Credential,
    /// A token that expired, or is not valid yet.
    Expired,
    /// The forward-auth service refused it, or could not decide.
    Forward,
}

impl Reason {
    pub const ALL: [Reason; 4] = [
        Reason::Address,
        Reason::Credential,
        Reason::Expired,
        Reason::Forward,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::Address => "address",
            Reason::Credential => "credential",
            Reason::Expired => "expired",
            Reason::Forward => "forward",
        }
    }
}

/// The answer a filter gives instead of letting the request on.
#[derive(Debug)]
pub struct Stop {
    pub status: u16,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: StopBody,
    /// A refusal, counted under this reason; `None` for an answer such as a preflight.
    pub denied: Option<Reason>,
}

#[derive(Debug)]
pub enum StopBody {
    /// The gateway's JSON error body with this message.
    Error(&'static str),
    /// Nothing.
    Empty,
    /// A body relayed as it came (the auth service's), with its content type.
    Relayed(Bytes, Option<HeaderValue>),
}

impl Stop {
    /// A refusal with the gateway's JSON error body.
    pub fn denied(status: u16, reason: Reason, message: &'static str) -> Stop {
        Stop {
            status,
            headers: Vec::new(),
            body: StopBody::Error(message),
            denied: Some(reason),
        }
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Stop {
        self.headers.push((name, value));
        self
    }
}
