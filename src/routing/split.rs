//! `split:` as a step of its route's chain ([`Split`]): the request's key (client address,
//! a header, a cookie, or a random draw) is hashed into one of 10,000 buckets
//! ([`crate::keys::bucket`]), and the buckets are dealt out to the other upstreams in the
//! file's order, each a run as long as its share, the rest staying with the route's own
//! upstream. The side is thus a pure function of the key and the shares: every instance of
//! a fleet puts one user on the same side without talking to the others, and raising the
//! first (or only) share only adds keys to its side, lowering it only takes keys away.
//!
//! The step notes the chosen upstream in the request's passage; the proxy sends the request
//! there (retries stay within it), and the access log and span name it. Each side's
//! requests are counted (`fanout_split_requests_total{route, upstream}`).

use async_trait::async_trait;
use pingora_proxy::Session;
use prometheus::IntCounter;

use crate::config::{KeySource, SplitConfig, UpstreamId};
use crate::filters::RequestFilter;
use crate::http::answer::Stop;
use crate::http::passage::Passage;
use crate::keys;

/// One side of a split: an upstream and the end of its run of buckets.
struct Side {
    upstream: UpstreamId,
    /// Buckets below this (and at or above the previous side's end) are this side's.
    until: u32,
    requests: IntCounter,
}

/// A route's split, built once per configuration.
pub(crate) struct Split {
    key: KeySource,
    sides: Vec<Side>,
    /// Requests that stayed with the route's own upstream.
    stayed: IntCounter,
}

impl Split {
    /// `route` is the route's label; `name` gives an upstream's name for the metric.
    pub(crate) fn new(
        config: &SplitConfig,
        own: UpstreamId,
        route: &str,
        name: impl Fn(UpstreamId) -> String,
        counter: impl Fn(&str, &str) -> IntCounter,
    ) -> Split {
        let mut until = 0;
        let sides = config
            .to
            .iter()
            .map(|&(upstream, share)| {
                until += share;
                Side {
                    upstream,
                    until,
                    requests: counter(route, &name(upstream)),
                }
            })
            .collect();
        Split {
            key: config.key.clone(),
            sides,
            stayed: counter(route, &name(own)),
        }
    }

    /// The side of a bucket: another upstream, or `None` for the route's own.
    fn side(&self, bucket: u32) -> Option<&Side> {
        self.sides.iter().find(|s| bucket < s.until)
    }
}

#[async_trait]
impl RequestFilter for Split {
    async fn request(&self, session: &mut Session, pass: &mut Passage) -> Result<(), Stop> {
        let mut buf = [0u8; 16];
        let key = keys::key_bytes(session.req_header(), &pass.client, &self.key, &mut buf);
        match self.side(keys::bucket(key)) {
            Some(side) => {
                side.requests.inc();
                pass.upstream = Some(side.upstream);
            }
            None => self.stayed.inc(),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(shares: &[u32]) -> Split {
        let config = SplitConfig {
            key: KeySource::Header(http::HeaderName::from_static("x-user")),
            to: shares
                .iter()
                .enumerate()
                .map(|(i, &s)| (i + 1, s))
                .collect(),
        };
        let counter = |_: &str, _: &str| IntCounter::new("t", "t").expect("counter");
        Split::new(&config, 0, "r", |u| u.to_string(), counter)
    }

    fn side_of(split: &Split, key: &str) -> UpstreamId {
        split
            .side(keys::bucket(key.as_bytes()))
            .map_or(0, |s| s.upstream)
    }

    #[test]
    fn a_share_gets_its_part_of_the_keys_and_growing_only_adds_keys() {
        let five = split(&[500]);
        let twenty = split(&[2000]);
        let keys: Vec<String> = (0..20_000).map(|i| format!("user-{i}")).collect();
        let on = |s: &Split| keys.iter().filter(|k| side_of(s, k) == 1).count();
        assert!((800..1200).contains(&on(&five)), "{}", on(&five));
        assert!((3600..4400).contains(&on(&twenty)), "{}", on(&twenty));
        for k in &keys {
            if side_of(&five, k) == 1 {
                assert_eq!(side_of(&twenty, k), 1, "{k} left the side when it grew");
            }
        }
    }

    #[test]
    fn sides_follow_the_files_order_and_the_rest_stays() {
        let s = split(&[1000, 3000]);
        let keys: Vec<String> = (0..20_000).map(|i| format!("k{i}")).collect();
        let count = |u| keys.iter().filter(|k| side_of(&s, k) == u).count();
        assert!((1700..2300).contains(&count(1)), "{}", count(1));
        assert!((5400..6600).contains(&count(2)), "{}", count(2));
        assert!((11_400..12_600).contains(&count(0)), "{}", count(0));
        assert_eq!(side_of(&split(&[0]), "anyone"), 0);
        assert_eq!(side_of(&split(&[10_000]), "anyone"), 1);
    }
}
