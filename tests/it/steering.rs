//! Traffic steering end to end: routes chosen by header, cookie and query; `split` sending
//! a share of the keys to another upstream, one side per key, growing only by adding keys;
//! what `-t` refuses.

use std::collections::HashMap;
use std::time::Duration;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_cookie_and_query_conditions_pick_the_route() {
    let (v1, v2, beta, q) = (
        Backend::start("v1").await,
        Backend::start("v2").await,
        Backend::start("beta").await,
        Backend::start("q").await,
    );
    let gw = Gateway::start(&format!(
        "upstreams:\n  v1: {{ backends: [{}] }}\n  v2: {{ backends: [{}] }}\n  beta: {{ backends: [{}] }}\n  q: {{ backends: [{}] }}\n\
         routes:\n\
         \x20 - {{ match: {{ prefix: /api }}, upstream: v1 }}\n\
         \x20 - {{ match: {{ prefix: /api, headers: {{ X-Canary: \"1\" }} }}, upstream: v2 }}\n\
         \x20 - {{ match: {{ prefix: /api, cookies: {{ beta: \"~^(on|1)$\" }} }}, upstream: beta }}\n\
         \x20 - {{ match: {{ prefix: /api, headers: {{ X-Canary: \"*\" }}, query: {{ v: \"2\" }} }}, upstream: q }}\n",
        v1.addr, v2.addr, beta.addr, q.addr
    ));
    let c = client();
    let via = |path: &str, fields: &[(&str, &str)]| {
        let mut req = c.get(gw.url(path));
        for (k, v) in fields {
            req = req.header(*k, *v);
        }
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.headers()["x-backend"].to_str().unwrap().to_string()
        }
    };
    assert_eq!(via("/api/x", &[]).await, "v1");
    assert_eq!(via("/api/x", &[("x-canary", "1")]).await, "v2");
    assert_eq!(via("/api/x", &[("x-canary", "0")]).await, "v1");
    assert_eq!(
        via("/api/x", &[("cookie", "theme=dark; beta=on")]).await,
        "beta"
    );
    assert_eq!(via("/api/x", &[("cookie", "beta=off")]).await, "v1");
    // Two conditions beat one.
    assert_eq!(via("/api/x?v=2", &[("x-canary", "1")]).await, "q");
    assert_eq!(via("/api/x?v=3", &[("x-canary", "1")]).await, "v2");
}

/// Sends one request per key in `users`, `rounds` times, and returns each key's side.
async fn sides(gw: &Gateway, users: &[String], rounds: usize) -> HashMap<String, String> {
    let c = client();
    let mut seen: HashMap<String, String> = HashMap::new();
    for _ in 0..rounds {
        for u in users {
            let resp = c
                .get(gw.url("/api/x"))
                .header("x-user-id", u)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            let side = resp.headers()["x-backend"].to_str().unwrap().to_string();
            if let Some(before) = seen.insert(u.clone(), side.clone()) {
                assert_eq!(before, side, "user {u} changed sides");
            }
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_sends_its_share_of_keys_and_growing_it_only_adds_keys() {
    let (v1, v3) = (Backend::start("v1").await, Backend::start("v3").await);
    let conf = |share: u32| {
        format!(
            "upstreams:\n  api_v1: {{ backends: [{}] }}\n  api_v3: {{ backends: [{}] }}\n\
             routes:\n  - name: api\n    match: {{ prefix: /api }}\n    upstream: api_v1\n    \
             split: {{ key: header:X-User-Id, to: {{ api_v3: {share}% }} }}\n",
            v1.addr, v3.addr
        )
    };
    let gw = Gateway::start(&conf(20));
    let users: Vec<String> = (0..400).map(|i| format!("user-{i}")).collect();
    // 2,000 requests from 400 keys: each key keeps its side.
    let first = sides(&gw, &users, 5).await;
    let on_v3 = first.values().filter(|s| *s == "v3").count();
    let share = on_v3 as f64 / users.len() as f64 * 100.0;
    assert!(
        (17.0..=23.0).contains(&share),
        "{share}% of keys on v3, not 20% ± 3"
    );
    let text = metrics_text(&client(), &gw).await;
    let count = |upstream: &str| -> f64 {
        let needle =
            format!("fanout_split_requests_total{{route=\"api\",upstream=\"{upstream}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(needle.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(-1.0)
    };
    assert_eq!(count("api_v3"), (on_v3 * 5) as f64, "{text}");
    let status = status_json(&client(), &gw).await;
    assert_eq!(
        status["routes"][0]["split"],
        serde_json::json!([{ "upstream": "api_v3", "percent": 20.0 }]),
        "{status}"
    );
    assert_eq!(count("api_v1"), ((400 - on_v3) * 5) as f64);

    // Raised to 40%: every key that was on v3 stays there; the others only join it.
    gw.rewrite(&format!("127.0.0.1:{}", gw.port), &conf(40));
    signal(gw.pid(), "-HUP");
    let c = client();
    eventually(
        Duration::from_secs(10),
        "the 40% split in force",
        || async { status_json(&c, &gw).await["config"]["generation"] == 2 },
    )
    .await;
    let second = sides(&gw, &users, 1).await;
    for (u, side) in &first {
        if side == "v3" {
            assert_eq!(second[u], "v3", "{u} left the side that grew");
        }
    }
    let grown = second.values().filter(|s| *s == "v3").count() as f64 / 4.0;
    assert!(
        (37.0..=43.0).contains(&grown),
        "{grown}% on v3 after raising to 40%"
    );
}

#[test]
fn check_refuses_a_split_that_cannot_be() {
    let upstreams = "listen: 127.0.0.1:1\nupstreams:\n  a: { backends: [127.0.0.1:2] }\n  b: { backends: [127.0.0.1:3] }\n  c: { backends: [127.0.0.1:4] }\n";
    let cases = [
        ("split: { to: { b: 60%, c: 50% } }", "over 100%"),
        ("split: { to: { a: 5% } }", "the route's own upstream"),
        ("split: { to: { nowhere: 5% } }", "unknown upstream"),
        ("split: { to: { b: 120 } }", "out of range"),
        ("split: { key: path, to: { b: 5% } }", "not allowed here"),
    ];
    for (split, says) in cases {
        let yaml =
            format!("{upstreams}routes:\n  - {{ match: {{ prefix: / }}, upstream: a, {split} }}\n");
        let (ok, out) = check_yaml(&yaml);
        assert!(!ok, "accepted: {split}");
        assert!(out.contains("routes[0].split"), "{split}: {out}");
        assert!(out.contains(says), "{split}: expected {says:?} in {out}");
    }
    let bad_match = format!(
        "{upstreams}routes:\n  - {{ match: {{ prefix: /, cookies: {{ beta: \"~(\" }} }}, upstream: a }}\n"
    );
    let (ok, out) = check_yaml(&bad_match);
    assert!(!ok);
    assert!(out.contains("routes[0].match.cookies.beta"), "{out}");
    assert!(out.contains("not a regular expression"), "{out}");
}

/// A request for `/x` carrying `cookie`.
async fn with_cookie(c: &reqwest::Client, gw: &Gateway, cookie: &str) -> reqwest::Response {
    c.get(gw.url("/x"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap()
}

/// Backends named a, b and c.
async fn three_backends() -> (Backend, Backend, Backend) {
    (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    )
}

/// The `fanout_affinity` cookie pair of an answer's `Set-Cookie`, if it sets one.
fn affinity(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("fanout_affinity="))
        .and_then(|v| v.split(';').next())
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_cookie_keeps_a_client_on_its_backend_until_that_backend_goes() {
    let (a, b, c3) = three_backends().await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  app:\n    balance: least_conn\n    sticky: {{ ttl: 1h }}\n    backends: [{}, {}, {}]\n\
         \x20   health_check: {{ path: /health, interval: 100ms, timeout: 1s, unhealthy_after: 1, healthy_after: 1 }}\n\
         routes:\n  - {{ match: {{ prefix: / }}, upstream: app }}\n",
        a.addr, b.addr, c3.addr
    ));
    let c = client();
    let first = c.get(gw.url("/x")).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let cookie = affinity(&first).expect("the first answer sets the cookie");
    let text = first.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        text.contains("HttpOnly") && text.contains("Max-Age=3600"),
        "{text}"
    );
    let home = first.headers()["x-backend"].to_str().unwrap().to_string();
    assert!(
        !cookie.contains("127.0.0.1"),
        "the cookie shows the address: {cookie}"
    );
    // 30 requests with the cookie: the same backend each time, and no new cookie.
    for _ in 0..30 {
        let resp = with_cookie(&c, &gw, &cookie).await;
        assert_eq!(resp.headers()["x-backend"].to_str().unwrap(), home);
        assert_eq!(affinity(&resp), None, "a valid cookie is not set again");
    }
    // A forged value is ignored (balanced as usual, a genuine cookie set), not an error.
    let resp = c
        .get(gw.url("/x"))
        .header("cookie", "fanout_affinity=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(affinity(&resp).is_some());
    // Its backend goes down: the client is balanced to another and its cookie renewed.
    let down = [&a, &b, &c3]
        .into_iter()
        .find(|x| x.state.name == home)
        .unwrap();
    down.set_healthy(false);
    eventually(
        Duration::from_secs(10),
        "the backend out of rotation",
        || async {
            let resp = with_cookie(&c, &gw, &cookie).await;
            resp.headers()["x-backend"].to_str().unwrap() != home
        },
    )
    .await;
    let resp = with_cookie(&c, &gw, &cookie).await;
    let moved = resp.headers()["x-backend"].to_str().unwrap().to_string();
    let renewed = affinity(&resp).expect("the cookie is renewed for the new backend");
    assert_ne!(renewed, cookie);
    for _ in 0..10 {
        let resp = with_cookie(&c, &gw, &renewed).await;
        assert_eq!(resp.headers()["x-backend"].to_str().unwrap(), moved);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_on_one_cookie_ignores_the_others() {
    let (a, b, c3) = three_backends().await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  app:\n    balance: consistent_hash\n    hash_key: cookie:session\n    backends: [{}, {}, {}]\n\
         routes:\n  - {{ match: {{ prefix: / }}, upstream: app }}\n",
        a.addr, b.addr, c3.addr
    ));
    let c = client();
    for user in 0..20 {
        let mut seen = std::collections::HashSet::new();
        for other in 0..5 {
            let cookie = format!("theme=t{other}; session=user-{user}; ts={}", other * 7);
            let resp = c
                .get(gw.url("/x"))
                .header("cookie", cookie)
                .send()
                .await
                .unwrap();
            seen.insert(resp.headers()["x-backend"].to_str().unwrap().to_string());
        }
        assert_eq!(
            seen.len(),
            1,
            "user-{user} moved when another cookie changed: {seen:?}"
        );
    }
}

#[test]
fn check_refuses_a_sticky_cookie_that_cannot_be() {
    let yaml = "listen: 127.0.0.1:1\nupstreams:\n  a: { backends: [127.0.0.1:2], sticky: { cookie: \"my cookie\", ttl: 0s } }\n\
        routes:\n  - { match: { prefix: / }, upstream: a }\n";
    let (ok, out) = check_yaml(yaml);
    assert!(!ok);
    assert!(out.contains("upstreams.a.sticky.cookie"), "{out}");
    assert!(out.contains("upstreams.a.sticky.ttl"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_state_on_disk_a_sticky_cookie_outlives_a_restart() {
    let (a, b, c3) = three_backends().await;
    let state = scratch_dir().join("state");
    let body = format!(
        "state: {{ store: disk, dir: {} }}\n\
         upstreams:\n  app:\n    sticky: {{}}\n    backends: [{}, {}, {}]\n\
         routes:\n  - {{ match: {{ prefix: / }}, upstream: app }}\n",
        state.display(),
        a.addr,
        b.addr,
        c3.addr
    );
    let c = client();
    let (cookie, home) = {
        let gw = Gateway::start(&body);
        let resp = c.get(gw.url("/x")).send().await.unwrap();
        let home = resp.headers()["x-backend"].to_str().unwrap().to_string();
        (affinity(&resp).expect("a cookie"), home)
    };
    let key = state.join("affinity.key");
    let meta = std::fs::metadata(&key).expect("the key file");
    assert_eq!(meta.len(), 32);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // Another process on the same state: the cookie is recognised, no new one is set.
    let gw = Gateway::start(&body);
    for _ in 0..10 {
        let resp = with_cookie(&c, &gw, &cookie).await;
        assert_eq!(resp.headers()["x-backend"].to_str().unwrap(), home);
        assert_eq!(affinity(&resp), None);
    }
    let _ = std::fs::remove_dir_all(state.parent().unwrap());
}

#[test]
fn check_refuses_state_it_cannot_keep() {
    let routes = "upstreams:\n  a: { backends: [127.0.0.1:2] }\nroutes:\n  - { match: { prefix: / }, upstream: a }\n";
    for (state, says) in [
        (
            "state: { store: disk, dir: relative/dir }",
            "not an absolute path",
        ),
        (
            "state: { store: memory, dir: /tmp/x }",
            "applies only to `store: disk`",
        ),
        ("state: { store: redis }", "not supported yet"),
    ] {
        let (ok, out) = check_yaml(&format!("listen: 127.0.0.1:1\n{state}\n{routes}"));
        assert!(!ok, "accepted: {state}");
        assert!(out.contains(says), "{state}: {out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_side_neither_reads_nor_fills_the_routes_cache() {
    let (v1, v3) = (Backend::start("v1").await, Backend::start("v3").await);
    let gw = Gateway::start(&format!(
        "upstreams:\n  api_v1: {{ backends: [{}] }}\n  api_v3: {{ backends: [{}] }}\n\
         routes:\n  - match: {{ prefix: /api }}\n    upstream: api_v1\n    cache: {{ ttl: 60s }}\n    \
         split: {{ key: header:X-User-Id, to: {{ api_v3: 50% }} }}\n",
        v1.addr, v3.addr
    ));
    let c = client();
    let ask = |user: String| {
        let req = c.get(gw.url("/api/page")).header("x-user-id", user);
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let backend = resp.headers()["x-backend"].to_str().unwrap().to_string();
            let cache = resp.headers()["x-cache"].to_str().unwrap().to_string();
            (backend, cache)
        }
    };
    // Find one user on each side.
    let mut on = std::collections::HashMap::new();
    for i in 0..200 {
        let user = format!("user-{i}");
        let (backend, _) = ask(user.clone()).await;
        on.entry(backend).or_insert(user);
        if on.len() == 2 {
            break;
        }
    }
    let (base_user, side_user) = (on["v1"].clone(), on["v3"].clone());
    // The baseline's answer is cached and served to its users; the side's users always
    // reach the side, and never get the baseline's entry.
    assert_eq!(ask(base_user.clone()).await, ("v1".into(), "HIT".into()));
    for _ in 0..3 {
        assert_eq!(ask(side_user.clone()).await, ("v3".into(), "BYPASS".into()));
    }
    let before = v3.hits();
    ask(side_user).await;
    assert_eq!(v3.hits(), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_sticky_cookies_valid() {
    let (a, b, c3) = three_backends().await;
    let conf = |extra: &str| {
        format!(
            "upstreams:\n  app:\n    sticky: {{}}\n    backends: [{}, {}, {}]\n\
             routes:\n  - {{ match: {{ prefix: / }}, upstream: app }}\n{extra}",
            a.addr, b.addr, c3.addr
        )
    };
    let gw = Gateway::start(&conf(""));
    let c = client();
    let first = c.get(gw.url("/x")).send().await.unwrap();
    let cookie = affinity(&first).expect("a cookie");
    let home = first.headers()["x-backend"].to_str().unwrap().to_string();
    // A reload that changes the routes: the signing key and the backends' ids stay.
    gw.rewrite(
        &format!("127.0.0.1:{}", gw.port),
        &conf("  - { match: { prefix: /other }, upstream: app }\n"),
    );
    signal(gw.pid(), "-HUP");
    eventually(Duration::from_secs(10), "the reload in force", || async {
        status_json(&c, &gw).await["config"]["generation"] == 2
    })
    .await;
    for _ in 0..10 {
        let resp = with_cookie(&c, &gw, &cookie).await;
        assert_eq!(resp.headers()["x-backend"].to_str().unwrap(), home);
        assert_eq!(affinity(&resp), None, "the cookie is still recognised");
    }
}
