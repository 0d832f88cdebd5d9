//! Rollouts (`rollout:` on a route): the gateway moving a route from its upstream to a
//! candidate step by step, judging each step on live traffic. This room holds the judge
//! ([`judge`]): the statistics that say, from both sides' figures over a step, whether the
//! candidate is worse (fail), not worse (pass), or whether it is too soon to say (it
//! depends on nothing else in the crate, so an outside controller built on the library can
//! use the same judgement); and the step's counting window ([`window`]): both sides'
//! requests, failures and a bounded latency sample, recorded without a lock.
//!
//! The step machine, the per-side counting on the request path, `state:` and the admin
//! endpoints come next (issue 44); until they land, `rollout:` is not accepted by `-t`.

pub mod judge;
pub mod window;
