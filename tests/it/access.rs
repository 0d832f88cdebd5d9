//! Access control: who the client is (PROXY protocol, trusted proxies), `access` lists,
//! each `auth` kind, CORS, redirects and rewrites — against real backends, a real auth
//! service and a real JWKS server written here, with tokens signed here.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::common::*;

/// A file in a scratch directory (removed with the directory when dropped).
struct Files(PathBuf);

impl Files {
    fn new() -> Files {
        Files(scratch_dir())
    }

    fn write(&self, name: &str, content: &str) -> String {
        let path = self.0.join(name);
        let part = self.0.join(format!("{name}.part"));
        std::fs::write(&part, content).unwrap();
        std::fs::rename(&part, &path).unwrap();
        path.display().to_string()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn basic(user: &str, password: &str) -> String {
    let raw = format!("{user}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An upstream and one route at `/`, with `route` appended to the route's keys.
fn one_route(b: &Backend, route: &str) -> String {
    format!(
        "upstreams:\n  u: {{ backends: [{}] }}\nroutes:\n  - match: {{ prefix: / }}\n    upstream: u\n{route}",
        b.addr
    )
}

fn header(seen: &Seen, name: &str) -> Option<String> {
    seen.headers
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_takes_a_good_password_and_refuses_the_rest() {
    let b = Backend::start("b").await;
    let files = Files::new();
    let hash = bcrypt::hash("s3cret", 6).unwrap();
    let htpasswd = files.write("users", &format!("# users\nalice:{hash}\n"));
    let gw = Gateway::start(&one_route(
        &b,
        &format!("    auth: {{ basic: {{ htpasswd: {htpasswd}, realm: api }} }}\n"),
    ));
    let c = client();
    let resp = c.get(gw.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["www-authenticate"], "Basic realm=\"api\"");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "unauthorized");
    for wrong in [
        basic("alice", "nope"),
        basic("bob", "s3cret"),
        "Basic !!!".into(),
    ] {
        let resp = c
            .get(gw.url("/x"))
            .header("authorization", wrong.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401, "{wrong}");
    }
    assert_eq!(b.hits(), 0, "a refused request reached the backend");
    for _ in 0..3 {
        let resp = c
            .get(gw.url("/x"))
            .header("authorization", basic("alice", "s3cret"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(b.hits(), 3);
    let line = stdout_line(&gw, "\"identity\":\"alice\"").await;
    assert!(!line.contains("s3cret"), "{line}");
    assert_eq!(
        metric(
            &c,
            &gw,
            "fanout_access_denied_total{reason=\"credential\",route=\"prefix:/\"}"
        )
        .await,
        4
    );

    // A reload reads the file again: a user added to it passes at once.
    let hash2 = bcrypt::hash("other", 6).unwrap();
    files.write("users", &format!("alice:{hash}\nbob:{hash2}\n"));
    let reload = c.post(gw.admin_url("/reload")).send().await.unwrap();
    assert_eq!(reload.status(), 200, "{}", reload.text().await.unwrap());
    let resp = c
        .get(gw.url("/x"))
        .header("authorization", basic("bob", "other"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // What a route's auth remembered does not outlive its file: a user removed from it is
    // refused at once, though its good password was verified (and remembered) before.
    files.write("users", &format!("bob:{hash2}\n"));
    let reload = c.post(gw.admin_url("/reload")).send().await.unwrap();
    assert_eq!(reload.status(), 200);
    let resp = c
        .get(gw.url("/x"))
        .header("authorization", basic("alice", "s3cret"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        401,
        "a remembered verdict survived the reload"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_from_a_header_or_the_query_name_their_user() {
    let b = Backend::start("b").await;
    let files = Files::new();
    let keys = files.write(
        "keys",
        "0123456789abcdef-alice alice\n0123456789abcdef-bob bob\n",
    );
    let body = format!(
        "upstreams:\n  u: {{ backends: [{}] }}\nroutes:\n\
         \x20 - match: {{ prefix: /h }}\n    upstream: u\n    auth: {{ api_key: {{ keys_file: {keys} }} }}\n\
         \x20   rate_limit: {{ requests_per_second: 0.001, burst: 2, key: identity }}\n\
         \x20 - match: {{ prefix: /q }}\n    upstream: u\n    auth: {{ api_key: {{ query: api_key, keys_file: {keys} }} }}\n",
        b.addr
    );
    let gw = Gateway::start(&body);
    let c = client();
    let send = |path: &str, key: Option<&str>| {
        let mut req = c.get(gw.url(path));
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        req.send()
    };
    assert_eq!(send("/h", None).await.unwrap().status(), 401);
    assert_eq!(
        send("/h", Some("0123456789abcdef-alicf"))
            .await
            .unwrap()
            .status(),
        401
    );
    // Each user has a bucket of their own: alice's two, then 429; bob still passes.
    for _ in 0..2 {
        let r = send("/h", Some("0123456789abcdef-alice")).await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = send("/h", Some("0123456789abcdef-alice")).await.unwrap();
    assert_eq!(r.status(), 429);
    let r = send("/h", Some("0123456789abcdef-bob")).await.unwrap();
    assert_eq!(r.status(), 200);

    // From the query: the key does not travel on.
    let r = c
        .get(gw.url("/q/x?a=1&api_key=0123456789abcdef-bob&b=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = b.seen();
    let last = seen.last().unwrap();
    assert_eq!(last.path, "/q/x?a=1&b=2");
    let r = c.get(gw.url("/q/x?api_key=wrong")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    stdout_line(&gw, "\"identity\":\"bob\"").await;
    assert!(!gw.stdout().contains("0123456789abcdef"));
}

/// Signing keys made for a test: an ES256 pair, an EdDSA pair, the RSA fixture.
struct Keys {
    ec: EncodingKey,
    ec_jwk: Value,
    other_ec: EncodingKey,
    ed: EncodingKey,
    ed_jwk: Value,
    rsa: EncodingKey,
    rsa_jwk: Value,
    rsa_public_pem: Vec<u8>,
}

fn ec_pair(kid: &str) -> (EncodingKey, Value) {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = pair.public_key_raw();
    let jwk = json!({
        "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
        "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
    });
    let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
    (key, jwk)
}

fn keys() -> Keys {
    let (ec, ec_jwk) = ec_pair("ec-1");
    let (other_ec, _) = ec_pair("ec-1");
    let ed_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let ed_jwk = json!({
        "kty": "OKP", "crv": "Ed25519", "kid": "ed-1", "alg": "EdDSA",
        "x": b64(ed_pair.public_key_raw()),
    });
    let ed = EncodingKey::from_ed_pem(ed_pair.serialize_pem().as_bytes()).unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/fixtures");
    let rsa_pem = std::fs::read(fixtures.join("rsa-test-key.pem")).unwrap();
    let rsa_jwk: Value =
        serde_json::from_slice(&std::fs::read(fixtures.join("rsa-test-jwk.json")).unwrap())
            .unwrap();
    Keys {
        ec,
        ec_jwk,
        other_ec,
        ed,
        ed_jwk,
        rsa: EncodingKey::from_rsa_pem(&rsa_pem).unwrap(),
        rsa_jwk,
        rsa_public_pem: std::fs::read(fixtures.join("rsa-test-pub.pem")).unwrap(),
    }
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(String::from);
    jsonwebtoken::encode(&h, claims, key).unwrap()
}

fn claims(extra: Value) -> Value {
    let mut c = json!({
        "sub": "user-7", "iss": "https://idp.test", "aud": "api",
        "exp": now() + 600, "scope": ["read", "write"],
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

async fn status_with(c: &reqwest::Client, gw: &Gateway, token: &str) -> reqwest::Response {
    c.get(gw.url("/x"))
        .header("authorization", format!("Bearer {token}"))
        .header("x-user-id", "forged")
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_tokens_are_held_to_their_keys_claims_and_algorithms() {
    let b = Backend::start("b").await;
    let k = keys();
    let files = Files::new();
    let jwks = files.write(
        "jwks.json",
        &json!({ "keys": [k.ec_jwk, k.ed_jwk, k.rsa_jwk] }).to_string(),
    );
    let gw = Gateway::start(&one_route(
        &b,
        &format!(
            "    auth:\n      jwt:\n        jwks_file: {jwks}\n        issuer: https://idp.test\n\
             \x20       audience: [api]\n        algorithms: [RS256, ES256, EdDSA]\n        leeway: 5s\n\
             \x20       claims_to_headers: {{ sub: X-User-Id, scope: X-User-Scope }}\n"
        ),
    ));
    let c = client();
    // Good tokens, each algorithm: the claims reach the backend, the forged header does not.
    let good = [
        sign(Algorithm::ES256, Some("ec-1"), &k.ec, &claims(json!({}))),
        sign(Algorithm::EdDSA, Some("ed-1"), &k.ed, &claims(json!({}))),
        sign(Algorithm::RS256, Some("rsa-1"), &k.rsa, &claims(json!({}))),
        sign(Algorithm::ES256, None, &k.ec, &claims(json!({}))),
    ];
    for t in &good {
        let resp = status_with(&c, &gw, t).await;
        assert_eq!(resp.status(), 200, "{t}");
        let seen = b.seen();
        let last = seen.last().unwrap();
        assert_eq!(header(last, "x-user-id").as_deref(), Some("user-7"));
        assert_eq!(header(last, "x-user-scope").as_deref(), Some("read write"));
    }
    let hits = b.hits();

    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims(json!({})).to_string().as_bytes())
    );
    let confused = sign(
        Algorithm::HS256,
        Some("rsa-1"),
        &EncodingKey::from_secret(&k.rsa_public_pem),
        &claims(json!({})),
    );
    let refused = [
        (
            "expired",
            sign(
                Algorithm::ES256,
                Some("ec-1"),
                &k.ec,
                &claims(json!({"exp": now() - 60})),
            ),
        ),
        (
            "not yet valid",
            sign(
                Algorithm::ES256,
                Some("ec-1"),
                &k.ec,
                &claims(json!({"nbf": now() + 600})),
            ),
        ),
        (
            "wrong audience",
            sign(
                Algorithm::ES256,
                Some("ec-1"),
                &k.ec,
                &claims(json!({"aud": "other"})),
            ),
        ),
        (
            "wrong issuer",
            sign(
                Algorithm::ES256,
                Some("ec-1"),
                &k.ec,
                &claims(json!({"iss": "https://evil.test"})),
            ),
        ),
        (
            "no exp",
            sign(
                Algorithm::ES256,
                Some("ec-1"),
                &k.ec,
                &json!({"sub": "x", "iss": "https://idp.test", "aud": "api"}),
            ),
        ),
        (
            "another key",
            sign(
                Algorithm::ES256,
                Some("ec-1"),
                &k.other_ec,
                &claims(json!({})),
            ),
        ),
        (
            "unknown kid",
            sign(Algorithm::ES256, Some("ec-9"), &k.ec, &claims(json!({}))),
        ),
        ("alg none", none),
        ("RS256 key as HS256 secret", confused),
        ("garbage", "not.a.token".to_string()),
    ];
    for (what, t) in &refused {
        let resp = status_with(&c, &gw, t).await;
        assert_eq!(resp.status(), 401, "{what}");
        let challenge = resp.headers()["www-authenticate"].to_str().unwrap();
        assert!(challenge.starts_with("Bearer"), "{what}: {challenge}");
    }
    let resp = c.get(gw.url("/x")).send().await.unwrap();
    assert_eq!(resp.status(), 401, "no token");
    assert_eq!(b.hits(), hits, "a refused token reached the backend");
    let series = |reason: &str| {
        format!("fanout_access_denied_total{{reason=\"{reason}\",route=\"prefix:/\"}}")
    };
    assert_eq!(metric(&c, &gw, &series("expired")).await, 2);
    assert_eq!(metric(&c, &gw, &series("credential")).await, 9);
    // A good token checked once is remembered; it stays good.
    let resp = status_with(&c, &gw, &good[0]).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hmac_tokens_need_a_secret_file() {
    let b = Backend::start("b").await;
    let files = Files::new();
    let secret = "a-secret-of-at-least-thirty-two-bytes!";
    let file = files.write("secret", &format!("{secret}\n"));
    let gw = Gateway::start(&one_route(
        &b,
        &format!("    auth: {{ jwt: {{ secret_file: {file} }} }}\n"),
    ));
    let c = client();
    let key = EncodingKey::from_secret(secret.as_bytes());
    let good = sign(
        Algorithm::HS256,
        None,
        &key,
        &json!({"sub": "svc", "exp": now() + 60}),
    );
    assert_eq!(status_with(&c, &gw, &good).await.status(), 200);
    let other = EncodingKey::from_secret(b"another-secret-of-thirty-two-bytes!!");
    let bad = sign(
        Algorithm::HS256,
        None,
        &other,
        &json!({"sub": "svc", "exp": now() + 60}),
    );
    assert_eq!(status_with(&c, &gw, &bad).await.status(), 401);
    let (ec, _) = ec_pair("k");
    let es = sign(
        Algorithm::ES256,
        None,
        &ec,
        &json!({"sub": "svc", "exp": now() + 60}),
    );
    assert_eq!(status_with(&c, &gw, &es).await.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_url_is_fetched_refreshed_and_kept_when_it_fails() {
    let b = Backend::start("b").await;
    let (k1, jwk1) = ec_pair("k1");
    let (k2, jwk2) = ec_pair("k2");
    let served = Arc::new(Mutex::new((200u16, json!({ "keys": [jwk1] }).to_string())));
    let now_serving = Arc::clone(&served);
    let jwks = Origin::start(
        Arc::new(move |_| {
            let (status, body) = now_serving.lock().unwrap().clone();
            (
                status,
                vec![("content-type".into(), "application/json".into())],
                body,
            )
        }),
        Duration::ZERO,
    )
    .await;
    let gw = Gateway::start(&one_route(
        &b,
        &format!(
            "    auth: {{ jwt: {{ jwks_url: \"http://{}/jwks\", refresh: 1s, algorithms: [ES256] }} }}\n",
            jwks.addr
        ),
    ));
    let c = client();
    let t1 = sign(
        Algorithm::ES256,
        Some("k1"),
        &k1,
        &json!({"sub": "a", "exp": now() + 600}),
    );
    assert_eq!(status_with(&c, &gw, &t1).await.status(), 200);
    let fetches = jwks.hits();
    assert!(fetches >= 1);

    // The JWKS fails: the keys in hand stay (each new token is checked, and asks for
    // the keys, which are refreshed once older than a second).
    *served.lock().unwrap() = (500, "oops".into());
    let mut n = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while jwks.hits() == fetches {
        assert!(Instant::now() < deadline, "no refresh was attempted");
        n += 1;
        let t = sign(
            Algorithm::ES256,
            Some("k1"),
            &k1,
            &json!({"sub": format!("s{n}"), "exp": now() + 600}),
        );
        assert_eq!(status_with(&c, &gw, &t).await.status(), 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t1b = sign(
        Algorithm::ES256,
        Some("k1"),
        &k1,
        &json!({"sub": "b", "exp": now() + 600}),
    );
    assert_eq!(status_with(&c, &gw, &t1b).await.status(), 200);

    // The key rotates: new tokens pass once the gateway has fetched it.
    *served.lock().unwrap() = (200, json!({ "keys": [jwk2] }).to_string());
    let t2 = sign(
        Algorithm::ES256,
        Some("k2"),
        &k2,
        &json!({"sub": "c", "exp": now() + 600}),
    );
    let (c2, gw2, t2r) = (&c, &gw, &t2);
    eventually(Duration::from_secs(10), "the rotated key", || async move {
        status_with(c2, gw2, t2r).await.status() == 200
    })
    .await;
    // The old key left the set: a token signed with it and never seen is refused.
    let t1c = sign(
        Algorithm::ES256,
        Some("k1"),
        &k1,
        &json!({"sub": "d", "exp": now() + 600}),
    );
    assert_eq!(status_with(&c, &gw, &t1c).await.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_auth_asks_a_service_and_never_allows_on_failure() {
    let b = Backend::start("b").await;
    let auth = Origin::start(
        Arc::new(|req: &http::request::Parts| {
            let given = req
                .headers
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_string());
            let uri = req
                .headers
                .get("x-forwarded-uri")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            match given.as_deref() {
                Some("Bearer good") => (
                    200,
                    vec![
                        ("x-user-id".into(), "u-1".into()),
                        ("x-seen-uri".into(), uri),
                    ],
                    String::new(),
                ),
                Some("Bearer banned") => (
                    403,
                    vec![("content-type".into(), "text/plain".into())],
                    "banned here".into(),
                ),
                _ => (
                    401,
                    vec![("www-authenticate".into(), "Bearer realm=\"sso\"".into())],
                    "log in first".into(),
                ),
            }
        }),
        Duration::ZERO,
    )
    .await;
    let slow = Origin::start(
        Arc::new(|_| (200, vec![], String::new())),
        Duration::from_secs(3),
    )
    .await;
    let down = free_port();
    let body = format!(
        "upstreams:\n  u: {{ backends: [{b}] }}\nroutes:\n\
         \x20 - match: {{ prefix: /a }}\n    upstream: u\n    auth: {{ forward: {{ url: \"http://{a}/check\", response_headers: [X-User-Id, X-Seen-Uri], cache: 30s, timeout: 1s }} }}\n\
         \x20 - match: {{ prefix: /slow }}\n    upstream: u\n    auth: {{ forward: {{ url: \"http://{s}/check\", timeout: 300ms }} }}\n\
         \x20 - match: {{ prefix: /down }}\n    upstream: u\n    auth: {{ forward: {{ url: \"http://127.0.0.1:{down}/check\" }} }}\n",
        b = b.addr,
        a = auth.addr,
        s = slow.addr,
    );
    let gw = Gateway::start(&body);
    let c = client();
    let with = |path: &str, token: &str| {
        c.get(gw.url(path))
            .header("authorization", format!("Bearer {token}"))
            .header("x-user-id", "forged")
            .send()
    };
    for _ in 0..3 {
        let r = with("/a/x?q=1", "good").await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(auth.hits(), 1, "the decision was not reused");
    let seen = b.seen();
    let last = seen.last().unwrap();
    assert_eq!(header(last, "x-user-id").as_deref(), Some("u-1"));
    assert_eq!(header(last, "x-seen-uri").as_deref(), Some("/a/x?q=1"));
    stdout_line(&gw, "\"identity\":\"u-1\"").await;

    let r = with("/a/x", "banned").await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.text().await.unwrap(), "banned here");
    let r = with("/a/x", "who").await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"sso\"");
    assert_eq!(r.text().await.unwrap(), "log in first");

    let started = Instant::now();
    let r = with("/slow/x", "good").await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    let r = with("/down/x", "good").await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(b.hits(), 3, "a refused request reached the backend");
    assert_eq!(
        metric(
            &c,
            &gw,
            "fanout_access_denied_total{reason=\"forward\",route=\"prefix:/a\"}"
        )
        .await,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_reaches_no_copy_and_no_cache() {
    let (primary, mirror, fallback, target) = (
        Backend::start("primary").await,
        Backend::start("mirror").await,
        Backend::start("fallback").await,
        Backend::start("target").await,
    );
    let files = Files::new();
    let keys = files.write("keys", "0123456789abcdef-good\n");
    let auth = format!("auth: {{ api_key: {{ keys_file: {keys} }} }}");
    let body = format!(
        "upstreams:\n  p: {{ backends: [{}] }}\n  m: {{ backends: [{}] }}\n  f: {{ backends: [{}] }}\n  t: {{ backends: [{}] }}\n\
         routes:\n\
         \x20 - match: {{ prefix: /copied }}\n    upstream: p\n    mirror: [{{ upstream: m }}]\n    fallback: [f]\n    {auth}\n\
         \x20 - match: {{ prefix: /cached }}\n    upstream: p\n    cache: {{ ttl: 60s }}\n    {auth}\n\
         \x20 - match: {{ prefix: /events }}\n    broadcast: [t]\n    {auth}\n",
        primary.addr, mirror.addr, fallback.addr, target.addr
    );
    let gw = Gateway::start(&body);
    let c = client();
    let r = c.get(gw.url("/copied/x")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(gw.url("/events"))
        .body("refused")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Fill the cache with an authorized request, then ask without a key.
    let r = c
        .get(gw.url("/cached/page"))
        .header("x-api-key", "0123456789abcdef-good")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c.get(gw.url("/cached/page")).send().await.unwrap();
    assert_eq!(r.status(), 401, "served from the cache without a key");
    // What was let through is delivered and copied: the refused ones would be there first.
    let r = c
        .post(gw.url("/events"))
        .header("x-api-key", "0123456789abcdef-good")
        .body("accepted")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // The primary fails, so that the fallback's copy is surely sent and used.
    primary.set_status(503);
    let r = c
        .get(gw.url("/copied/y"))
        .header("x-api-key", "0123456789abcdef-good")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-backend"], "fallback");
    eventually(Duration::from_secs(5), "the accepted copies", || async {
        target.hits() == 1 && mirror.hits() == 1 && fallback.hits() == 1
    })
    .await;
    assert_eq!(target.seen()[0].body, "accepted");
    assert_eq!(mirror.seen()[0].path, "/copied/y");
    assert_eq!(fallback.seen()[0].path, "/copied/y");
    // The mirror lost the credential; the primary kept it.
    assert_eq!(header(&mirror.seen()[0], "x-api-key"), None);
    let paths: Vec<String> = primary.seen().iter().map(|s| s.path.clone()).collect();
    assert_eq!(paths, ["/cached/page", "/copied/y"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_lists_and_trusted_proxies_decide_who_the_client_is() {
    let b = Backend::start("b").await;
    let body = format!(
        "clients: {{ trusted_proxies: [127.0.0.1] }}\n\
         upstreams:\n  u: {{ backends: [{}] }}\nroutes:\n\
         \x20 - match: {{ prefix: /inner }}\n    upstream: u\n    access: {{ allow: [10.0.0.0/8, \"2001:db8::/32\"], deny: [10.66.0.0/16] }}\n\
         \x20 - match: {{ prefix: / }}\n    upstream: u\n",
        b.addr
    );
    let gw = Gateway::start(&body);
    let c = client();
    let from = |path: &str, xff: Option<&str>| {
        let mut r = c.get(gw.url(path));
        if let Some(x) = xff {
            r = r.header("x-forwarded-for", x);
        }
        r.send()
    };
    // The loopback peer is a trusted proxy: X-Forwarded-For names the client.
    assert_eq!(from("/inner", None).await.unwrap().status(), 403);
    assert_eq!(
        from("/inner", Some("10.1.2.3")).await.unwrap().status(),
        200
    );
    assert_eq!(
        from("/inner", Some("2001:db8::9")).await.unwrap().status(),
        200
    );
    assert_eq!(
        from("/inner", Some("10.66.0.1")).await.unwrap().status(),
        403
    );
    // The right-most untrusted address counts, not what the client wrote to its left.
    let r = from("/inner", Some("10.1.2.3, 192.0.2.5")).await.unwrap();
    assert_eq!(r.status(), 403);
    let r = from("/x", Some("198.51.100.1, 203.0.113.9")).await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = b.seen();
    assert_eq!(
        header(seen.last().unwrap(), "x-forwarded-for").as_deref(),
        Some("203.0.113.9, 127.0.0.1")
    );
    stdout_line(&gw, "\"client\":\"203.0.113.9\"").await;
    assert_eq!(
        metric(
            &c,
            &gw,
            "fanout_access_denied_total{reason=\"address\",route=\"prefix:/inner\"}"
        )
        .await,
        3
    );

    // Without trusted proxies, X-Forwarded-For is not believed, nor passed on.
    let b2 = Backend::start("b2").await;
    let gw2 = Gateway::start(&one_route(&b2, ""));
    let r = c
        .get(gw2.url("/y"))
        .header("x-forwarded-for", "203.0.113.7")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&b2.seen()[0], "x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
    stdout_line(&gw2, "\"client\":\"127.0.0.1\"").await;
    assert!(!gw2.stdout().contains("203.0.113.7"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_headers_name_the_client_and_a_bad_one_closes() {
    let b = Backend::start("b").await;
    let gw = Gateway::start_listening(
        |port| format!("[{{ address: \"127.0.0.1:{port}\", proxy_protocol: true }}]"),
        &one_route(&b, "    access: { deny: [192.0.2.0/24] }\n"),
    );
    let request = "GET /v1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let (answer, _) = raw(
        gw.port,
        format!("PROXY TCP4 203.0.113.7 127.0.0.1 40000 80\r\n{request}").as_bytes(),
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    v2.extend_from_slice(&[198, 51, 100, 9, 127, 0, 0, 1, 0x9c, 0x40, 0, 80]);
    v2.extend_from_slice(request.replace("/v1", "/v2").as_bytes());
    let (answer, _) = raw(gw.port, &v2);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = b.seen();
    assert_eq!(
        header(&seen[0], "x-forwarded-for").as_deref(),
        Some("203.0.113.7")
    );
    assert_eq!(
        header(&seen[1], "x-forwarded-for").as_deref(),
        Some("198.51.100.9")
    );
    stdout_line(&gw, "\"client\":\"198.51.100.9\"").await;
    // The header's address is what `access` judges.
    let (answer, _) = raw(
        gw.port,
        format!("PROXY TCP4 192.0.2.1 127.0.0.1 40000 80\r\n{request}").as_bytes(),
    );
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    // No header, or a broken one: closed without an answer, counted.
    for bad in [
        request.to_string(),
        format!("PROXY TCP4 nonsense\r\n{request}"),
        format!("PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n{request}"),
    ] {
        let (answer, closed) = raw(gw.port, bad.as_bytes());
        assert!(closed && answer.is_empty(), "{bad:?}: {answer}");
    }
    assert_eq!(b.hits(), 2);
    let c = client();
    assert_eq!(
        metric(
            &c,
            &gw,
            "fanout_client_refused_total{reason=\"proxy_protocol\"}"
        )
        .await,
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflights_are_answered_and_answers_carry_the_headers() {
    let b = Backend::start("b").await;
    let files = Files::new();
    let keys = files.write("keys", "0123456789abcdef-good\n");
    let gw = Gateway::start(&one_route(
        &b,
        &format!(
            "    cors: {{ origins: [\"https://app.example.com\"], methods: [GET, PUT], headers: [X-API-Key], credentials: true, max_age: 10m, expose_headers: [X-Backend] }}\n\
             \x20   auth: {{ api_key: {{ keys_file: {keys} }} }}\n"
        ),
    ));
    let c = client();
    let preflight = |origin: &str, method: &str, headers: &str| {
        c.request(reqwest::Method::OPTIONS, gw.url("/x"))
            .header("origin", origin)
            .header("access-control-request-method", method)
            .header("access-control-request-headers", headers)
            .send()
    };
    let r = preflight("https://app.example.com", "PUT", "x-api-key, content-type")
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert_eq!(h["access-control-allow-methods"], "GET, PUT");
    assert_eq!(h["access-control-allow-headers"], "x-api-key");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-max-age"], "600");
    assert_eq!(h["vary"], "Origin");
    for (origin, method, headers) in [
        ("https://evil.example.com", "PUT", ""),
        ("https://app.example.com", "DELETE", ""),
        ("https://app.example.com", "GET", "x-other"),
    ] {
        let r = preflight(origin, method, headers).await.unwrap();
        assert_eq!(r.status(), 403, "{origin} {method} {headers}");
        assert!(!r.headers().contains_key("access-control-allow-origin"));
    }
    assert_eq!(b.hits(), 0, "a preflight reached the backend");

    let r = c
        .get(gw.url("/x"))
        .header("origin", "https://app.example.com")
        .header("x-api-key", "0123456789abcdef-good")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert_eq!(h["access-control-expose-headers"], "x-backend");
    assert_eq!(h["vary"], "Origin");
    // The gateway's own 401 carries them too: the page's script can read it.
    let r = c
        .get(gw.url("/x"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let r = c
        .get(gw.url("/x"))
        .header("origin", "https://evil.example.com")
        .header("x-api-key", "0123456789abcdef-good")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r.headers().contains_key("access-control-allow-origin"));
    assert_eq!(r.headers()["vary"], "Origin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_and_rewrites_shape_what_the_client_and_upstream_see() {
    let b = Backend::start("b").await;
    let body = format!(
        "upstreams:\n  u: {{ backends: [{}] }}\nroutes:\n\
         \x20 - match: {{ prefix: /old }}\n    redirect: {{ to: \"https://{{host}}/new{{path}}{{query}}\", status: 308 }}\n\
         \x20 - match: {{ path: /home }}\n    redirect: {{ to: /index.html }}\n\
         \x20 - match: {{ prefix: /admin-api/ }}\n    upstream: u\n    rewrite: {{ regex: \"^/admin-api/v1/(?P<rest>.*)$\", to: \"/v1/${{rest}}\" }}\n\
         \x20 - match: {{ prefix: /climb/ }}\n    upstream: u\n    rewrite: {{ regex: \"^/climb/(.)(.*)$\", to: \"/$1$1/$2\" }}\n",
        b.addr
    );
    let gw = Gateway::start(&body);
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_follow
        .get(format!("http://127.0.0.1:{}/old/a/b?x=1", gw.port))
        .header("host", "example.com:8080")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(
        r.headers()["location"],
        "https://example.com/new/old/a/b?x=1"
    );
    let r = no_follow.get(gw.url("/home")).send().await.unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], "/index.html");

    let r = no_follow
        .get(gw.url("/admin-api/v1/users/7?full=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(b.seen()[0].path, "/v1/users/7?full=1");
    // A rewrite that would climb out of the root is refused, never sent.
    let r = no_follow.get(gw.url("/climb/.x")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(b.hits(), 1);
    stdout_line(&gw, "\"path\":\"/admin-api/v1/users/7\"").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_hold_over_http2_too() {
    let b = Backend::start("b").await;
    let files = Files::new();
    let keys = files.write("keys", "0123456789abcdef-h2 h2-client\n");
    let gw = Gateway::start_listening(
        |port| format!("[{{ address: \"127.0.0.1:{port}\", http2: true }}]"),
        &one_route(
            &b,
            &format!(
                "    access: {{ deny: [10.0.0.0/8] }}\n    auth: {{ api_key: {{ keys_file: {keys} }} }}\n"
            ),
        ),
    );
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2.get(gw.url("/x")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 401);
    let r = h2
        .get(gw.url("/x"))
        .header("x-api-key", "0123456789abcdef-h2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(b.hits(), 1);
    stdout_line(&gw, "\"identity\":\"h2-client\"").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_own_429_on_a_cors_route_carries_the_cors_headers() {
    let b = Backend::start("b").await;
    let gw = Gateway::start(&one_route(
        &b,
        "    cors: { origins: [\"https://app.example.com\"] }\n    rate_limit: { requests_per_second: 0.001, burst: 1 }\n",
    ));
    let c = client();
    let send = || {
        c.get(gw.url("/x"))
            .header("origin", "https://app.example.com")
            .send()
    };
    assert_eq!(send().await.unwrap().status(), 200);
    let r = send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(r.headers()["vary"], "Origin");
}
