//! RFC 9111 freshness to the letter, beside what `pingora-cache` decides:
//!
//! - the fields that decide (RFC 9213): `Fanout-Cache-Control`, the field targeted at this
//!   gateway, else `CDN-Cache-Control`, take the place of `Cache-Control` and `Expires`
//!   when present ([`decisive`]);
//! - the freshness lifetime (4.2.1): `s-maxage`, else `max-age`, else `Expires` minus the
//!   answer's own `Date` (not the gateway's clock), an `Expires` in any of RFC 9110's three
//!   date formats (IMF-fixdate, RFC 850, asctime) and an invalid one meaning "already
//!   expired" ([`lifetime`]);
//! - the age an answer already had when it arrived (4.2.3): the larger of its `Age` and the
//!   time since its `Date` ([`initial_age`]). The stored entry is dated that much earlier, so
//!   it stays fresh only for what is left of its lifetime, and the `Age` sent with a hit
//!   (the time since the entry's creation, 5.1) counts the upstream's age too.

use std::time::{Duration, SystemTime};

use pingora_cache::cache_control::{CacheControl, InterpretCacheControl};
use pingora_http::ResponseHeader;

/// Cache-Control fields targeted at caches (RFC 9213), the most specific first.
pub const TARGETED: [&str; 2] = ["fanout-cache-control", "cdn-cache-control"];

/// The header the cache's decisions read: `resp` with its `Cache-Control` replaced by the
/// first targeted field it carries (and its `Expires` dropped, which a targeted field
/// overrides as well); `None` when it carries none.
pub fn decisive(resp: &ResponseHeader) -> Option<ResponseHeader> {
    for name in TARGETED {
        let values: Vec<&[u8]> = resp
            .headers
            .get_all(name)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        if values.is_empty() {
            continue;
        }
        let mut d = resp.clone();
        d.remove_header(&http::header::CACHE_CONTROL);
        d.remove_header(&http::header::EXPIRES);
        let joined = values.join(&b", "[..]);
        if d.insert_header(http::header::CACHE_CONTROL, joined)
            .is_err()
        {
            continue;
        }
        return Some(d);
    }
    None
}

/// A date field in any of RFC 9110's three formats.
pub fn date(resp: &ResponseHeader, name: http::HeaderName) -> Option<SystemTime> {
    let text = resp.headers.get(name)?.to_str().ok()?;
    httpdate::parse_http_date(text.trim()).ok()
}

/// The answer's age when it arrived (RFC 9111 4.2.3, its `corrected_initial_age`, with the
/// request's own delay taken as nothing): the larger of its `Age` and the time since its
/// `Date`.
pub fn initial_age(resp: &ResponseHeader, now: SystemTime) -> Duration {
    let age_value = resp
        .headers
        .get(http::header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_secs);
    let apparent = date(resp, http::header::DATE)
        .and_then(|d| now.duration_since(d).ok())
        .unwrap_or(Duration::ZERO);
    age_value.max(apparent)
}

/// The freshness lifetime the answer states (RFC 9111 4.2.1): `s-maxage`, else `max-age`,
/// else `Expires` minus `Date` (the time the answer was made, else `now`). `None`: it
/// states none (a heuristic or the route's `ttl` may apply).
pub fn lifetime(
    cc: Option<&CacheControl>,
    resp: &ResponseHeader,
    now: SystemTime,
) -> Option<Duration> {
    if let Some(d) = cc.and_then(|cc| cc.fresh_duration()) {
        return Some(d);
    }
    let mut all = resp.headers.get_all(http::header::EXPIRES).iter();
    let first = all.next()?;
    if all.next().is_some() {
        // Two values: invalid, so already expired.
        return Some(Duration::ZERO);
    }
    let expires = first
        .to_str()
        .ok()
        .and_then(|t| httpdate::parse_http_date(t.trim()).ok());
    let Some(expires) = expires else {
        return Some(Duration::ZERO);
    };
    let made = date(resp, http::header::DATE).unwrap_or(now);
    Some(expires.duration_since(made).unwrap_or(Duration::ZERO))
}

/// When an entry made `now` from an answer `age` old, fresh for `lifetime`, stops being
/// fresh, and the time it counts as created.
pub fn window(now: SystemTime, age: Duration, lifetime: Duration) -> (SystemTime, SystemTime) {
    let created = now.checked_sub(age).unwrap_or(now);
    let until = if lifetime <= age {
        // Stale on arrival (or stored to be revalidated at once).
        now.checked_sub(Duration::from_secs(1)).unwrap_or(now)
    } else {
        created + lifetime
    };
    (until, created)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(headers: &[(&str, &str)]) -> ResponseHeader {
        let mut r = ResponseHeader::build(200, None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn at(text: &str) -> SystemTime {
        httpdate::parse_http_date(text).unwrap()
    }

    #[test]
    fn expires_counts_from_the_answers_date_in_all_three_formats() {
        let now = at("Sun, 06 Nov 1994 09:00:00 GMT");
        for expires in [
            "Sun, 06 Nov 1994 08:59:37 GMT",
            "Sunday, 06-Nov-94 08:59:37 GMT",
            "Sun Nov  6 08:59:37 1994",
        ] {
            let r = resp(&[
                ("date", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ("expires", expires),
            ]);
            // Ten minutes from its Date, whatever the gateway's clock says.
            assert_eq!(
                lifetime(None, &r, now),
                Some(Duration::from_secs(600)),
                "{expires}"
            );
        }
        let bad = resp(&[("expires", "0")]);
        assert_eq!(lifetime(None, &bad, now), Some(Duration::ZERO));
        assert_eq!(lifetime(None, &resp(&[]), now), None);
    }

    #[test]
    fn the_age_is_the_larger_of_age_and_the_time_since_date() {
        let now = at("Sun, 06 Nov 1994 09:00:00 GMT");
        let r = resp(&[("age", "50"), ("date", "Sun, 06 Nov 1994 08:59:50 GMT")]);
        assert_eq!(initial_age(&r, now), Duration::from_secs(50));
        let r = resp(&[("age", "5"), ("date", "Sun, 06 Nov 1994 08:58:00 GMT")]);
        assert_eq!(initial_age(&r, now), Duration::from_secs(120));
        let (until, created) = window(now, Duration::from_secs(50), Duration::from_secs(60));
        assert_eq!(until.duration_since(now).unwrap(), Duration::from_secs(10));
        assert_eq!(
            now.duration_since(created).unwrap(),
            Duration::from_secs(50)
        );
        let (until, _) = window(now, Duration::from_secs(70), Duration::from_secs(60));
        assert!(until < now);
    }

    #[test]
    fn a_targeted_field_takes_the_place_of_cache_control_and_expires() {
        let r = resp(&[
            ("cache-control", "no-store"),
            ("expires", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ("cdn-cache-control", "max-age=30"),
        ]);
        let d = decisive(&r).unwrap();
        assert_eq!(d.headers["cache-control"], "max-age=30");
        assert!(d.headers.get("expires").is_none());
        let r = resp(&[
            ("cdn-cache-control", "max-age=30"),
            ("fanout-cache-control", "max-age=5"),
        ]);
        assert_eq!(decisive(&r).unwrap().headers["cache-control"], "max-age=5");
        assert!(decisive(&resp(&[("cache-control", "max-age=1")])).is_none());
    }
}
