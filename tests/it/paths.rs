//! Paths are normalised before routing: traversal variants cannot leave the route they
//! seem to match, the backend gets the path that was routed, and paths that cannot be
//! normalised safely get 400 without reaching any backend; over HTTP/1.1 and HTTP/2 alike.

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_variants_are_normalised_or_refused() {
    let (public, admin) = (
        Backend::start("public").await,
        Backend::start("admin").await,
    );
    let gw = Gateway::start_listening(
        |port| format!("[{{ address: \"127.0.0.1:{port}\", http2: true }}]"),
        &format!(
            "upstreams:\n  pub: {{ backends: [{}] }}\n  adm: {{ backends: [{}] }}\n\
             routes:\n  - {{ match: {{ prefix: /public/ }}, upstream: pub, strip_prefix: true }}\n\
             \x20 - {{ match: {{ prefix: /admin }}, upstream: adm }}\n",
            public.addr, admin.addr
        ),
    );
    // (request-target, status, backend, path it receives)
    let cases: &[(&str, u16, &str, &str)] = &[
        ("/public/../admin/secret", 200, "admin", "/admin/secret"),
        ("/public/%2e%2e/admin", 200, "admin", "/admin"),
        ("/public/%2E%2E/admin/x", 200, "admin", "/admin/x"),
        ("/public/.%2e/admin", 200, "admin", "/admin"),
        ("/public/./a/../b?q=1", 200, "public", "/b?q=1"),
        ("/public//x", 200, "public", "/x"),
        ("//public///x", 200, "public", "/x"),
        ("/public/%7e%41", 200, "public", "/~A"),
        ("/public/a%20b", 200, "public", "/a%20b"),
        ("/public/..%2fadmin", 400, "", ""),
        ("/public/..%2Fadmin", 400, "", ""),
        ("/public/..%5cadmin", 400, "", ""),
        ("/public/..\\admin", 400, "", ""),
        ("/public/../../admin", 400, "", ""),
        ("/%2e%2e/admin", 400, "", ""),
        ("/public/%zz", 400, "", ""),
        // `..;` is `..` to Tomcat, Jetty and Spring: refused, however it is written.
        ("/public/..;/admin/secret", 400, "", ""),
        ("/public/%2e%2e;/admin/x", 400, "", ""),
        ("/public/%2E%2E;jsessionid=x/admin", 400, "", ""),
        ("/public/.%2e;/admin", 400, "", ""),
        ("/public/.;/admin", 400, "", ""),
        ("/public/..;", 400, "", ""),
        ("/public/a;b/..;/admin", 400, "", ""),
        ("/public/a;b/c", 200, "public", "/a;b/c"),
        ("/public/x..;/y", 200, "public", "/x..;/y"),
    ];
    for (n, (target, status, backend, path)) in cases.iter().enumerate() {
        // Each case over HTTP/1.1 (case n), then over h2c (case n + 1000).
        let i = n;
        let request =
            format!("GET {target} HTTP/1.1\r\nHost: a\r\nX-Case: {i}\r\nConnection: close\r\n\r\n");
        let port = gw.port;
        let (answer, _) = tokio::task::spawn_blocking(move || raw(port, request.as_bytes()))
            .await
            .unwrap();
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{target}: {answer}"
        );
        check_seen(&[&public, &admin], i, *status, backend, path, target);
        let i = n + 1000;
        let mut conn = h2::H2Conn::open(gw.port).await;
        let mut fields = h2::get("a", target);
        fields.push((b"x-case".to_vec(), i.to_string().into_bytes()));
        conn.headers(1, &fields, true).await;
        let outcome = conn.outcome(1).await;
        assert_eq!(outcome, h2::Outcome::Status(*status), "h2 {target}");
        check_seen(&[&public, &admin], i, *status, backend, path, target);
    }
    // The access log names the path that was routed.
    let line = stdout_line(&gw, "/admin/secret").await;
    assert!(!line.contains(".."), "{line}");
}

/// Asserts that case `i` reached `backend` alone with `path` (status 200), or nothing.
fn check_seen(
    backends: &[&Backend],
    i: usize,
    status: u16,
    backend: &str,
    path: &str,
    target: &str,
) {
    {
        let seen: Vec<(String, String)> = backends
            .iter()
            .flat_map(|b| {
                b.seen().into_iter().filter_map(|s| {
                    let case = s.headers.get("x-case")?.to_str().ok()?.to_string();
                    (case == i.to_string()).then(|| (b.state.name.clone(), s.path))
                })
            })
            .collect();
        match status {
            200 => assert_eq!(
                seen,
                vec![(backend.to_string(), path.to_string())],
                "{target}"
            ),
            _ => assert!(seen.is_empty(), "{target} reached {seen:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_slashes_may_be_kept_or_decoded() {
    let b = Backend::start("b").await;
    for (policy, target, expect) in [
        ("keep", "/a%2fb/c", "/a%2Fb/c"),
        ("decode", "/a%2fb/../c", "/a/c"),
    ] {
        let gw = Gateway::start(&format!(
            "clients: {{ encoded_slashes: {policy} }}\nupstreams:\n  u: {{ backends: [{}] }}\n\
             routes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
            b.addr
        ));
        // Raw: an HTTP client library would remove the dot segments itself.
        let request = format!("GET {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let port = gw.port;
        let (answer, _) = tokio::task::spawn_blocking(move || raw(port, request.as_bytes()))
            .await
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{policy}: {answer}");
        assert_eq!(b.seen().last().unwrap().path, expect, "{policy}");
    }
}
