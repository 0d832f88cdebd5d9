//! The extension point: `examples/custom_filter.rs`, a gateway built on the library with a
//! filter of its own (`tenant`), run as a user would run it. Its `-t` checks a route's
//! `plugins:` through the filter's constructor; the stock `fanout` says it knows no such
//! filter; the running gateway refuses and lets on requests as the filter says, and adds to
//! their answers.

use std::path::PathBuf;
use std::process::Command;

use crate::common::*;

/// The example's binary, built beside `fanout`. `cargo test` builds examples with the rest;
/// a run limited to this test binary does not, so one missing or older than `fanout` (built
/// from an older library) is built here.
fn example() -> PathBuf {
    let fanout = std::path::Path::new(fanout_bin());
    let bin = fanout
        .parent()
        .expect("the binaries' directory")
        .join("examples")
        .join("custom_filter");
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if modified(&bin) < modified(fanout) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // Only what a shell gives: the variables cargo sets for a test would change the
        // build scripts' inputs and rebuild dependencies.
        let kept = [
            "PATH",
            "HOME",
            "CARGO_HOME",
            "RUSTUP_HOME",
            "RUSTUP_TOOLCHAIN",
        ];
        let built = Command::new(cargo)
            .env_clear()
            .envs(std::env::vars().filter(|(k, _)| kept.contains(&k.as_str())))
            .args(["build", "--release", "--example", "custom_filter"])
            .status()
            .expect("cargo build --example custom_filter");
        assert!(built.success(), "the example did not build");
    }
    bin
}

fn routes(backend: std::net::SocketAddr, config: &str) -> String {
    format!(
        "upstreams:\n  api:\n    backends: [\"{backend}\"]\n\
         routes:\n  - match: {{ prefix: / }}\n    upstream: api\n    plugins:\n      - name: tenant\n        config: {config}\n"
    )
}

fn check_with(binary: &std::path::Path, yaml: &str) -> (bool, String) {
    check_yaml_with(binary, &format!("listen: 127.0.0.1:1\n{yaml}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_with_its_own_filter_checks_and_runs_it() {
    let bin = example();
    let backend = Backend::start("api").await;
    let good = routes(backend.addr, "{ header: X-Tenant, allow: [acme, globex] }");

    // -t: the filter's constructor is the check.
    let (ok, out) = check_with(&bin, &good);
    assert!(ok, "{out}");
    let (ok, out) = check_with(&bin, &routes(backend.addr, "{ header: X-Tenant }"));
    assert!(!ok);
    let out = out.trim();
    assert_eq!(out.lines().count(), 1, "one line: {out}");
    assert!(
        out.contains("fanout.yaml:")
            && out.ends_with(": routes[0].plugins[0]: config.allow: a list of tenants is required"),
        "the file, its line and the place, as other errors: {out}"
    );
    // The stock binary registers no filter: it says so, and which it knows.
    let (ok, out) = check_with(std::path::Path::new(fanout_bin()), &good);
    assert!(!ok);
    assert!(
        out.contains("routes[0].plugins[0]: no filter is registered as \"tenant\" (this binary registers none)"),
        "{out}"
    );

    let gw = Gateway::start_binary(&bin, &good);
    let c = client();
    let send = |tenant: Option<&'static str>| {
        let mut req = c.get(gw.url("/orders"));
        if let Some(t) = tenant {
            req = req.header("x-tenant", t);
        }
        req.send()
    };
    let refused = send(None).await.unwrap();
    assert_eq!(refused.status(), 403);
    assert_eq!(refused.headers()["x-tenant-checked"], "yes");
    assert_eq!(send(Some("initech")).await.unwrap().status(), 403);
    let allowed = send(Some("acme")).await.unwrap();
    assert_eq!(allowed.status(), 200);
    assert_eq!(allowed.headers()["x-tenant-checked"], "yes");
    assert_eq!(
        backend.hits(),
        1,
        "only the allowed request reached the backend"
    );
    let metrics = metrics_text(&c, &gw).await;
    assert!(
        metrics.contains("fanout_access_denied_total{reason=\"credential\",route=\"prefix:/\"} 2"),
        "{metrics}"
    );
}
