//! The cache to the letter of RFC 9111, one rule per test, each against an origin that
//! sets the exact header fields of the rule and counts what reaches it.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Utc};

use crate::common::*;

fn cached_route(origin: &Origin) -> String {
    format!(
        "upstreams:\n  o: {{ backends: [{}] }}\nroutes:\n  - match: {{ prefix: / }}\n    upstream: o\n    cache: {{}}\n",
        origin.addr
    )
}

/// An origin answering every request with `headers` (made per request) and body "v".
async fn origin_with(
    headers: impl Fn() -> Vec<(String, String)> + Send + Sync + 'static,
) -> Origin {
    Origin::start(
        Arc::new(move |_| (200, headers(), "v".to_string())),
        Duration::ZERO,
    )
    .await
}

struct Answer {
    status: u16,
    cache: String,
    headers: reqwest::header::HeaderMap,
}

async fn fetch(c: &reqwest::Client, gw: &Gateway, method: reqwest::Method, path: &str) -> Answer {
    let r = c.request(method, gw.url(path)).send().await.unwrap();
    let headers = r.headers().clone();
    Answer {
        status: r.status().as_u16(),
        cache: headers
            .get("x-cache")
            .map_or(String::new(), |v| v.to_str().unwrap().to_string()),
        headers,
    }
}

async fn get(c: &reqwest::Client, gw: &Gateway, path: &str) -> Answer {
    fetch(c, gw, reqwest::Method::GET, path).await
}

fn http_date(t: SystemTime) -> String {
    httpdate::fmt_http_date(t)
}

/// Waits (at most `limit`) until a GET of `path` is no longer a hit; returns how long that
/// took.
async fn until_not_hit(c: &reqwest::Client, gw: &Gateway, path: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let a = get(c, gw, path).await;
        if a.cache != "HIT" {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "still a hit after {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_age_shortens_freshness_and_shows_on_hits() {
    // 4.2.3 and 5.1: max-age=60 with Age: 57 leaves 3 s, and the hit's Age counts the 57.
    let origin = origin_with(|| {
        vec![
            ("cache-control".into(), "max-age=60".into()),
            ("age".into(), "57".into()),
        ]
    })
    .await;
    let gw = Gateway::start(&cached_route(&origin));
    let c = client();
    assert_eq!(get(&c, &gw, "/a").await.cache, "MISS");
    let hit = get(&c, &gw, "/a").await;
    assert_eq!(hit.cache, "HIT");
    let age: u64 = hit.headers["age"].to_str().unwrap().parse().unwrap();
    assert!((57..60).contains(&age), "Age {age}");
    // Fresh for what is left of its 60 s, not for 60 s more.
    let took = until_not_hit(&c, &gw, "/a", Duration::from_secs(10)).await;
    assert!(took < Duration::from_secs(5), "{took:?}");
    // Older than its lifetime on arrival: stored stale, never a hit.
    let stale = origin_with(|| {
        vec![
            ("cache-control".into(), "max-age=60".into()),
            ("age".into(), "61".into()),
        ]
    })
    .await;
    let gw2 = Gateway::start(&cached_route(&stale));
    get(&c, &gw2, "/b").await;
    assert_ne!(get(&c, &gw2, "/b").await.cache, "HIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expires_counts_from_the_answers_date_and_a_hit_says_its_age() {
    // 4.2.1: an origin whose clock is an hour ahead: Expires is 3 s after its Date, so the
    // answer is fresh for 3 s, not for an hour. A hit's `Date` is when it is sent (Pingora
    // 0.9's HTTP/1 and HTTP/2 servers set it on every answer); its `Age` says how old the
    // stored answer is (RFC 9111 5.1), so a client's age (4.2.3: the larger of `Age` and
    // the time since `Date`) is right.
    let origin = origin_with(|| {
        let date = SystemTime::now() + Duration::from_secs(3600);
        vec![
            ("date".into(), http_date(date)),
            ("expires".into(), http_date(date + Duration::from_secs(3))),
        ]
    })
    .await;
    let gw = Gateway::start(&cached_route(&origin));
    let c = client();
    let first = get(&c, &gw, "/e").await;
    assert_eq!(first.cache, "MISS");
    let hit = get(&c, &gw, "/e").await;
    assert_eq!(hit.cache, "HIT");
    let age: u64 = hit.headers["age"]
        .to_str()
        .ok()
        .and_then(|a| a.parse().ok())
        .expect("an Age on the hit");
    assert!(age <= 3, "Age {age}");
    assert!(hit.headers.contains_key("date"), "{:?}", hit.headers);
    let took = until_not_hit(&c, &gw, "/e", Duration::from_secs(10)).await;
    assert!(took < Duration::from_secs(6), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expires_is_read_in_every_date_format() {
    // RFC 9110 5.6.7: a recipient MUST accept the obsolete RFC 850 and asctime formats.
    type Format = fn(DateTime<Utc>) -> String;
    let formats: [(&str, Format); 3] = [
        ("imf", |t| t.format("%a, %d %b %Y %H:%M:%S GMT").to_string()),
        ("rfc850", |t| {
            t.format("%A, %d-%b-%y %H:%M:%S GMT").to_string()
        }),
        ("asctime", |t| t.format("%a %b %e %H:%M:%S %Y").to_string()),
    ];
    for (name, format) in formats {
        let origin = origin_with(move || {
            let later: DateTime<Utc> = (SystemTime::now() + Duration::from_secs(3600)).into();
            vec![("expires".into(), format(later))]
        })
        .await;
        let gw = Gateway::start(&cached_route(&origin));
        let c = client();
        get(&c, &gw, "/x").await;
        assert_eq!(get(&c, &gw, "/x").await.cache, "HIT", "{name}");
        assert_eq!(origin.hits(), 1, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_304_updates_the_stored_header_fields() {
    // 4.3.4: the cache MUST update its header fields with those of the 304.
    let version = Arc::new(AtomicUsize::new(1));
    let v = Arc::clone(&version);
    let origin = Origin::start(
        Arc::new(move |req: &http::request::Parts| {
            let n = v.load(SeqCst);
            if req
                .headers
                .get("if-none-match")
                .is_some_and(|e| e == "\"e1\"")
            {
                return (
                    304,
                    vec![
                        ("etag".into(), "\"e1\"".into()),
                        ("cache-control".into(), "max-age=60".into()),
                        ("x-version".into(), n.to_string()),
                    ],
                    String::new(),
                );
            }
            (
                200,
                vec![
                    ("etag".into(), "\"e1\"".into()),
                    ("cache-control".into(), "max-age=1".into()),
                    ("x-version".into(), n.to_string()),
                ],
                "body".into(),
            )
        }),
        Duration::ZERO,
    )
    .await;
    let gw = Gateway::start(&cached_route(&origin));
    let c = client();
    let first = get(&c, &gw, "/r").await;
    assert_eq!(first.headers["x-version"], "1");
    version.store(2, SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    let revalidated = loop {
        let a = get(&c, &gw, "/r").await;
        if a.cache == "REVALIDATED" {
            break a;
        }
        assert!(Instant::now() < deadline, "never revalidated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(revalidated.headers["x-version"], "2");
    let hit = get(&c, &gw, "/r").await;
    assert_eq!(hit.cache, "HIT");
    assert_eq!(
        hit.headers["x-version"], "2",
        "the stored fields were not updated"
    );
    assert_eq!(origin.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_unsafe_request_invalidates_its_uri_and_location() {
    // 4.4: POST, PUT, DELETE answered with a non-error status invalidate the target URI and
    // the Location / Content-Location on the same host.
    let origin = Origin::start(
        Arc::new(|req: &http::request::Parts| match req.method.as_str() {
            "GET" => (
                200,
                vec![("cache-control".into(), "max-age=600".into())],
                "v".into(),
            ),
            "POST" => (
                201,
                vec![("location".into(), "/items/7".into())],
                String::new(),
            ),
            "PUT" => (500, vec![], String::new()),
            _ => (
                204,
                vec![("content-location".into(), "/items/8".into())],
                String::new(),
            ),
        }),
        Duration::ZERO,
    )
    .await;
    let gw = Gateway::start(&cached_route(&origin));
    let c = client();
    for path in ["/items", "/items/7", "/items/8", "/other"] {
        get(&c, &gw, path).await;
        assert_eq!(get(&c, &gw, path).await.cache, "HIT", "{path}");
    }
    // A failed unsafe request invalidates nothing.
    assert_eq!(
        fetch(&c, &gw, reqwest::Method::PUT, "/items").await.status,
        500
    );
    assert_eq!(get(&c, &gw, "/items").await.cache, "HIT");
    assert_eq!(
        fetch(&c, &gw, reqwest::Method::POST, "/items").await.status,
        201
    );
    assert_eq!(get(&c, &gw, "/items").await.cache, "MISS");
    assert_eq!(get(&c, &gw, "/items/7").await.cache, "MISS");
    assert_eq!(get(&c, &gw, "/items/8").await.cache, "HIT");
    assert_eq!(
        fetch(&c, &gw, reqwest::Method::DELETE, "/items/9")
            .await
            .status,
        204
    );
    assert_eq!(get(&c, &gw, "/items/8").await.cache, "MISS");
    assert_eq!(get(&c, &gw, "/other").await.cache, "HIT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targeted_cache_control_fields_take_precedence() {
    // RFC 9213: CDN-Cache-Control over Cache-Control; Fanout-Cache-Control over both.
    let cdn = origin_with(|| {
        vec![
            ("cache-control".into(), "no-store".into()),
            ("cdn-cache-control".into(), "max-age=600".into()),
        ]
    })
    .await;
    let gw = Gateway::start(&cached_route(&cdn));
    let c = client();
    get(&c, &gw, "/c").await;
    let hit = get(&c, &gw, "/c").await;
    assert_eq!(hit.cache, "HIT");
    // The client still gets the answer's own Cache-Control.
    assert_eq!(hit.headers["cache-control"], "no-store");
    let ours = origin_with(|| {
        vec![
            ("cache-control".into(), "max-age=600".into()),
            ("cdn-cache-control".into(), "max-age=600".into()),
            ("fanout-cache-control".into(), "no-store".into()),
        ]
    })
    .await;
    let gw2 = Gateway::start(&cached_route(&ours));
    get(&c, &gw2, "/f").await;
    assert_ne!(get(&c, &gw2, "/f").await.cache, "HIT");
    assert_eq!(ours.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_targeted_field_is_ignored_whole() {
    // RFC 9213 2.1 (RFC 8941): a CDN-Cache-Control that does not parse as a dictionary, or
    // whose max-age is no integer, is ignored: the answer's `no-store` holds.
    for bad in ["max-age=10000, &&&&&", "max-age=\"10000\""] {
        let origin = origin_with(move || {
            vec![
                ("cache-control".into(), "no-store".into()),
                ("cdn-cache-control".into(), bad.into()),
            ]
        })
        .await;
        let gw = Gateway::start(&cached_route(&origin));
        let c = client();
        get(&c, &gw, "/i").await;
        assert_ne!(get(&c, &gw, "/i").await.cache, "HIT", "{bad}");
        assert_eq!(origin.hits(), 2, "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_age_listed_twice_counts_by_its_first_value() {
    // RFC 9111 5.1: `Age: 7200, 0` is 7200 s: older than max-age=3600, never a hit.
    let origin = origin_with(|| {
        vec![
            ("cache-control".into(), "max-age=3600".into()),
            ("age".into(), "7200, 0".into()),
        ]
    })
    .await;
    let gw = Gateway::start(&cached_route(&origin));
    let c = client();
    get(&c, &gw, "/age").await;
    assert_ne!(get(&c, &gw, "/age").await.cache, "HIT");
    assert_eq!(origin.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expires_is_read_in_any_letter_case_and_spacing() {
    // RFC 9110 5.6.7: recipients parse dates robustly.
    type Format = fn(DateTime<Utc>) -> String;
    let formats: [(&str, Format); 3] = [
        ("lower imf", |t| {
            t.format("%a, %d %b %Y %H:%M:%S GMT")
                .to_string()
                .to_lowercase()
        }),
        ("upper rfc850", |t| {
            t.format("%A, %d-%b-%y %H:%M:%S GMT")
                .to_string()
                .to_uppercase()
        }),
        ("asctime, padded day", |t| {
            t.format("%a %b %e %H:%M:%S %Y").to_string().to_lowercase()
        }),
    ];
    for (name, format) in formats {
        let origin = origin_with(move || {
            let later: DateTime<Utc> = (SystemTime::now() + Duration::from_secs(3600)).into();
            vec![("expires".into(), format(later))]
        })
        .await;
        let gw = Gateway::start(&cached_route(&origin));
        let c = client();
        get(&c, &gw, "/x").await;
        assert_eq!(get(&c, &gw, "/x").await.cache, "HIT", "{name}");
        assert_eq!(origin.hits(), 1, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_whitespace_does_not_split_vary_variants() {
    let origin = origin_with(|| {
        vec![
            ("cache-control".into(), "max-age=600".into()),
            ("vary".into(), "Accept-Language".into()),
        ]
    })
    .await;
    let gw = Gateway::start(&cached_route(&origin));
    let c = client();
    let ask = |lang: &'static str| {
        let (c, url) = (c.clone(), gw.url("/v"));
        async move {
            let r = c
                .get(url)
                .header("accept-language", lang)
                .send()
                .await
                .unwrap();
            r.headers()["x-cache"].to_str().unwrap().to_string()
        }
    };
    assert_eq!(ask("en-US, fr;q=0.5").await, "MISS");
    assert_eq!(ask("en-US,fr; q=0.5").await, "HIT");
    assert_eq!(ask("en-US ,  fr ;q=0.5").await, "HIT");
    assert_eq!(ask("de").await, "MISS");
    assert_eq!(origin.hits(), 2);
}
