//! The admin listener: /health, /ready, /metrics, /status.

use std::time::Duration;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_report_the_gateway() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    b.set_status(500);
    let gw = Gateway::start(&format!(
        "upstreams:\n  ok: {{ backends: [{}] }}\n  failing:\n    backends: [{{ address: {}, weight: 3 }}]\n\
         routes:\n  - {{ name: good, match: {{ prefix: /good }}, upstream: ok }}\n  - {{ match: {{ prefix: /bad }}, upstream: failing }}\n",
        a.addr, b.addr
    ));
    let c = client();
    for _ in 0..3 {
        assert_eq!(get(&c, &gw.url("/good")).await.0, 200);
    }
    assert_eq!(get(&c, &gw.url("/bad")).await.0, 500);
    assert_eq!(get(&c, &gw.url("/none")).await.0, 404);

    let health = c.get(gw.admin_url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let health: serde_json::Value = health.json().await.unwrap();
    assert_eq!(health["status"], "UP");
    assert!(health["uptime_seconds"].is_u64());
    assert!(health["uptime"].as_str().unwrap().ends_with('s'));

    let ready = c.get(gw.admin_url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);

    let metrics = c.get(gw.admin_url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    // A request is counted in its logging phase, which runs after its answer went out:
    // the client may see the answer before the count.
    eventually(Duration::from_secs(5), "every request counted", || async {
        metrics_text(&c, &gw)
            .await
            .contains("fanout_requests_total{route=\"none\",status=\"404\"} 1")
            && status_json(&c, &gw).await["totals"]["responses"] == 5
    })
    .await;
    let text = metrics_text(&c, &gw).await;
    for needle in [
        "fanout_requests_total{route=\"good\",status=\"200\"} 3",
        "fanout_requests_total{route=\"prefix:/bad\",status=\"500\"} 1",
        "fanout_requests_total{route=\"none\",status=\"404\"} 1",
        "fanout_request_duration_seconds_count{route=\"good\"} 3",
        &format!("fanout_upstream_requests_total{{backend=\"{}\",outcome=\"ok\",upstream=\"ok\"}} 3", a.addr),
        &format!("fanout_upstream_requests_total{{backend=\"{}\",outcome=\"error\",upstream=\"failing\"}} 1", b.addr),
        &format!("fanout_backend_healthy{{backend=\"{}\",upstream=\"ok\"}} 1", a.addr),
        &format!("fanout_backend_inflight{{backend=\"{}\",upstream=\"ok\"}} 0", a.addr),
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }

    let status: serde_json::Value = status_json(&c, &gw).await;
    assert_eq!(status["totals"]["requests"], 5);
    assert_eq!(status["totals"]["responses"], 5);
    assert_eq!(status["totals"]["errors"], 1);
    let failing = &status["upstreams"][1];
    assert_eq!(failing["name"], "failing");
    assert_eq!(failing["backends"][0]["address"], b.addr.to_string());
    assert_eq!(failing["backends"][0]["weight"], 3);
    assert_eq!(failing["backends"][0]["healthy"], true);
    assert_eq!(failing["backends"][0]["inflight"], 0);
    assert_eq!(status["routes"][0]["route"], "good");
    assert_eq!(status["routes"][0]["kind"], "proxy");
    assert_eq!(status["routes"][1]["route"], "prefix:/bad");

    assert_eq!(
        c.get(gw.admin_url("/nope")).send().await.unwrap().status(),
        404
    );
    assert_eq!(
        c.post(gw.admin_url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        405
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_only_health_and_ready_are_open() {
    let b = Backend::start("b").await;
    let dir = scratch_dir();
    let token_file = dir.join("admin.token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let conf = dir.join("fanout.yaml");
    let gw = Gateway::spawn_with(|port, admin| {
        let yaml = format!(
            "server: {{ threads: 1, pid_file: {d}/p.pid, upgrade_sock: {d}/u.sock }}\n\
             listen: [\"127.0.0.1:{port}\"]\n\
             admin: {{ address: \"127.0.0.1:{admin}\", token_file: {t} }}\n\
             upstreams:\n  u: {{ backends: [{b}] }}\nroutes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
            d = dir.display(),
            t = token_file.display(),
            b = b.addr
        );
        std::fs::write(&conf, yaml).unwrap();
        vec!["-c".into(), conf.display().to_string()]
    });
    let c = client();
    let status = |path: &'static str, auth: Option<&'static str>| {
        let (c, url) = (c.clone(), gw.admin_url(path));
        async move {
            let mut req = c.get(url);
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let resp = req.send().await.unwrap();
            let challenge = resp.headers().get("www-authenticate").cloned();
            (resp.status().as_u16(), challenge)
        }
    };
    assert_eq!(status("/health", None).await.0, 200);
    assert_eq!(status("/ready", None).await.0, 200);
    for path in ["/metrics", "/status", "/nothing"] {
        let (code, challenge) = status(path, None).await;
        assert_eq!(code, 401, "{path}");
        assert_eq!(challenge.unwrap(), "Bearer");
        assert_eq!(status(path, Some("Bearer wrong")).await.0, 401);
        assert_eq!(status(path, Some("Bearer s3cret-toke")).await.0, 401);
        assert_eq!(status(path, Some("Basic s3cret-token")).await.0, 401);
    }
    assert_eq!(status("/status", Some("Bearer s3cret-token")).await.0, 200);
    let text = c
        .get(gw.admin_url("/metrics"))
        .header("authorization", "Bearer s3cret-token")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("fanout_admin_unauthorized_total 12"),
        "{}",
        text.lines()
            .filter(|l| l.contains("unauthorized"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
