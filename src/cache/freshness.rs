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
//!   (the time since the entry's creation, 5.1) counts the upstream's age too. An `Age`
//!   listed twice counts by its first value (5.1);
//! - a targeted field that is not a valid Structured Fields dictionary, or whose
//!   `max-age`/`s-maxage` is not an integer, is ignored whole (RFC 9213 2.1);
//! - dates are read as robustly as RFC 9110 5.6.7 asks: any letter case, a space-padded
//!   asctime day, runs of spaces ([`parse_date`]).

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
        if values.is_empty() || !values.iter().all(|v| valid_targeted(v)) {
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

/// Whether a targeted field's value is a Structured Fields dictionary (RFC 8941 3.2) whose
/// freshness directives have integer values. The check is the grammar's, kept to what a
/// cache-control dictionary holds: keys, and values that are integers, decimals, tokens,
/// strings or booleans, each with parameters.
fn valid_targeted(value: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(value) else {
        return false;
    };
    let members = text.split(',').map(|m| m.trim_matches([' ', '\t']));
    members.into_iter().all(|member| {
        let mut parts = member.split(';');
        let Some(first) = parts.next() else {
            return false;
        };
        let (key, item) = match first.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (first, None),
        };
        let integer_wanted = matches!(
            key,
            "max-age" | "s-maxage" | "stale-while-revalidate" | "stale-if-error"
        );
        let item_ok = match item {
            None => true,
            Some(v) if integer_wanted => is_integer(v),
            Some(v) => is_bare_item(v),
        };
        sf_key(key)
            && item_ok
            && parts.all(|p| match p.trim_start().split_once('=') {
                Some((k, v)) => sf_key(k) && is_bare_item(v),
                None => sf_key(p.trim_start()),
            })
    })
}

fn sf_key(k: &str) -> bool {
    let mut chars = k.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '*')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-.*".contains(c))
}

fn is_integer(v: &str) -> bool {
    let digits = v.strip_prefix('-').unwrap_or(v);
    !digits.is_empty() && digits.len() <= 15 && digits.bytes().all(|b| b.is_ascii_digit())
}

fn is_bare_item(v: &str) -> bool {
    let decimal = || {
        v.split_once('.').is_some_and(|(i, f)| {
            is_integer(i) && !f.is_empty() && f.len() <= 3 && f.bytes().all(|b| b.is_ascii_digit())
        })
    };
    let string = || {
        v.len() >= 2
            && v.starts_with('"')
            && v.ends_with('"')
            && v[1..v.len() - 1].bytes().all(|b| (0x20..0x7f).contains(&b))
    };
    let token = || {
        let mut chars = v.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '*')
            && chars.all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~:/".contains(c))
    };
    is_integer(v) || decimal() || string() || token() || v == "?0" || v == "?1"
}

/// A date in any of RFC 9110's three formats (IMF-fixdate, RFC 850, asctime), read
/// robustly (5.6.7): names in any letter case, a space-padded day, runs of whitespace; the
/// weekday is not checked against the date.
pub fn parse_date(text: &str) -> Option<SystemTime> {
    const MONTHS: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    let tokens: Vec<&str> = text
        .split([' ', '\t', ',', '-'])
        .filter(|t| !t.is_empty())
        .collect();
    let month_at = tokens
        .iter()
        .position(|t| MONTHS.contains(&t.to_ascii_lowercase().as_str()))?;
    let month = MONTHS
        .iter()
        .position(|m| *m == tokens[month_at].to_ascii_lowercase())? as u32
        + 1;
    let time = tokens.iter().find(|t| t.contains(':'))?;
    // Beside the month, only a weekday and the zone `GMT` are words a date holds.
    const WEEKDAYS: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    let word_ok = |t: &str| {
        let t = t.to_ascii_lowercase();
        t == "gmt"
            || WEEKDAYS
                .iter()
                .any(|d| *d == t || (t.len() == 3 && d.starts_with(&t)))
    };
    let words_ok = tokens
        .iter()
        .enumerate()
        .filter(|(i, t)| *i != month_at && t.bytes().all(|b| b.is_ascii_alphabetic()))
        .all(|(_, t)| word_ok(t));
    let numbers: Vec<(usize, &str)> = tokens
        .iter()
        .enumerate()
        .filter(|(_, t)| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
        .map(|(i, t)| (i, *t))
        .collect();
    let (day, year) = match numbers.as_slice() {
        [(_, a), (_, b)] if b.len() == 4 => (*a, b.parse::<i32>().ok()?),
        [(_, a), (_, b)] if a.len() == 4 => (*b, a.parse::<i32>().ok()?),
        // RFC 850: day before the month, a two-digit year after it.
        [(i, a), (j, b)] if *i < month_at && *j > month_at && b.len() == 2 => {
            let yy = b.parse::<i32>().ok()?;
            (*a, if yy < 70 { 2000 + yy } else { 1900 + yy })
        }
        _ => return None,
    };
    if !words_ok || day.len() > 2 {
        return None;
    }
    let mut hms = time.split(':').map(|p| p.parse::<u32>().ok());
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    let date = chrono::NaiveDate::from_ymd_opt(year, month, day.parse().ok()?)?;
    let at = date.and_hms_opt(h, m, s)?.and_utc().timestamp();
    let secs = u64::try_from(at).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// A date field in any of RFC 9110's three formats.
pub fn date(resp: &ResponseHeader, name: http::HeaderName) -> Option<SystemTime> {
    parse_date(resp.headers.get(name)?.to_str().ok()?)
}

/// `resp` with its `Expires` (if valid in any form [`parse_date`] reads) written as an
/// IMF-fixdate, the only form `pingora-cache`'s own reading takes; `None` when there is
/// nothing to rewrite.
pub fn canonical_expires(resp: &ResponseHeader) -> Option<ResponseHeader> {
    let text = resp.headers.get(http::header::EXPIRES)?.to_str().ok()?;
    if resp.headers.get_all(http::header::EXPIRES).iter().count() != 1 {
        return None;
    }
    let canonical = httpdate::fmt_http_date(parse_date(text)?);
    if canonical == text {
        return None;
    }
    let mut out = resp.clone();
    out.insert_header(http::header::EXPIRES, canonical).ok()?;
    Some(out)
}

/// The answer's age when it arrived (RFC 9111 4.2.3, its `corrected_initial_age`, with the
/// request's own delay taken as nothing): the larger of its `Age` and the time since its
/// `Date`.
pub fn initial_age(resp: &ResponseHeader, now: SystemTime) -> Duration {
    let age_value = resp
        .headers
        .get(http::header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
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
    let expires = first.to_str().ok().and_then(parse_date);
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
    fn dates_are_read_in_any_case_and_spacing() {
        let want = at("Thu, 08 Aug 2024 12:00:00 GMT");
        for text in [
            "Thu, 08 Aug 2024 12:00:00 GMT",
            "thu, 08 aug 2024 12:00:00 gmt",
            "THU, 08 AUG 2024 12:00:00 GMT",
            "Thursday, 08-Aug-24 12:00:00 GMT",
            "Thu Aug  8 12:00:00 2024",
            "thu aug 8 12:00:00 2024",
            "  Thu,  08 Aug 2024 12:00:00 GMT ",
        ] {
            assert_eq!(parse_date(text), Some(want), "{text:?}");
        }
        for bad in [
            "0",
            "-1",
            "Thu, 32 Aug 2024 12:00:00 GMT",
            "tomorrow",
            "Thu, 08 Aug 2024 12:00:00 PST",
        ] {
            assert_eq!(parse_date(bad), None, "{bad:?}");
        }
        let r = resp(&[("expires", "thu aug  8 12:00:00 2024")]);
        let c = canonical_expires(&r).unwrap();
        assert_eq!(c.headers["expires"], "Thu, 08 Aug 2024 12:00:00 GMT");
    }

    #[test]
    fn the_first_age_counts() {
        let now = at("Sun, 06 Nov 1994 09:00:00 GMT");
        let r = resp(&[("age", "7200, 0")]);
        assert_eq!(initial_age(&r, now), Duration::from_secs(7200));
    }

    #[test]
    fn an_invalid_targeted_field_is_ignored_whole() {
        for bad in [
            "max-age=10000, &&&&&",
            "max-age=\"10000\"",
            "max-age=1.5",
            "Max-Age=10",
        ] {
            let r = resp(&[("cache-control", "no-store"), ("cdn-cache-control", bad)]);
            assert!(decisive(&r).is_none(), "{bad}");
        }
        for good in [
            "max-age=10, stale-if-error=60",
            "no-store",
            "max-age=10;x=\"y\", private",
        ] {
            let r = resp(&[("cdn-cache-control", good)]);
            assert!(decisive(&r).is_some(), "{good}");
        }
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
