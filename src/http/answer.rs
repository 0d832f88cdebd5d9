//! An answer the gateway gives itself instead of letting a request on (no route, a step's
//! refusal, a preflight, a redirect, a request refused for its form), and why a request was
//! refused (the `reason` label of
//! `fanout_access_denied_total`).

use bytes::Bytes;
use http::{HeaderName, HeaderValue};

/// The words of the `error` field for a status the gateway produced.
pub fn reason(status: u16) -> &'static str {
    match status {
        400 => "bad request",
        404 => "no route",
        405 => "method not allowed",
        413 => "request body too large",
        429 => "rate limit exceeded",
        501 => "not implemented",
        502 => "upstream unavailable",
        503 => "no healthy backend",
        504 => "upstream timed out",
        _ => "internal error",
    }
}

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
    /// The gateway's own answer for `status`, with the JSON error body naming it (404 "no
    /// route", 405 "method not allowed"...).
    pub fn error(status: u16) -> Stop {
        Stop::error_saying(status, reason(status))
    }

    /// An answer with the gateway's JSON error body saying `message`, not counted as an
    /// access refusal.
    pub fn error_saying(status: u16, message: &'static str) -> Stop {
        Stop {
            status,
            headers: Vec::new(),
            body: StopBody::Error(message),
            denied: None,
        }
    }

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
