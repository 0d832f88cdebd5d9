//! `fanout -t`: the example configurations pass; a broken file gets one line per problem,
//! naming the key path and line, and starting with it fails the same way without a panic.

use std::process::Command;

use crate::common::fanout_bin;

fn check(path: &str) -> (i32, String, String) {
    let out = Command::new(fanout_bin())
        .args(["-t", "-c", path])
        .output()
        .expect("run fanout -t");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_example_configuration_passes() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/conf");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let (code, stdout, stderr) = check(path.to_str().unwrap());
            assert_eq!(code, 0, "{}: {stderr}", path.display());
            assert_eq!(stdout.trim(), "configuration OK");
            checked += 1;
        }
    }
    assert!(checked >= 1);
}

const BROKEN: &str = r#"listen: ["127.0.0.1:0"]
upstreams:
  api:
    balance: fastest
    backends:
      - 127.0.0.1:8081
      - x:y
    timeouts: { connect: 10 }
routes:
  - match: { prefix: /api }
    upstream: api
    colour: blue
  - match: { prefix: /b }
    upstream: missing
"#;

#[test]
fn broken_file_gets_one_line_per_problem() {
    let path = std::env::temp_dir().join(format!("fanout-broken-{}.yaml", std::process::id()));
    std::fs::write(&path, BROKEN).unwrap();
    let p = path.to_str().unwrap();
    let (code, stdout, stderr) = check(p);
    assert_ne!(code, 0);
    assert!(!stdout.contains("configuration OK"));
    let lines: Vec<&str> = stderr.lines().collect();
    let expect = [
        format!("{p}:4: upstreams.api.balance: `fastest` is not one of round_robin, weighted, least_conn, consistent_hash"),
        format!("{p}:7: upstreams.api.backends[1]: invalid address \"x:y\""),
        format!("{p}:8: upstreams.api.timeouts.connect: duration 10 needs a unit"),
        format!("{p}:12: routes[0].colour: unknown key `colour`"),
        format!("{p}:14: routes[1].upstream: unknown upstream \"missing\""),
    ];
    for e in &expect {
        assert!(
            lines.iter().any(|l| l.starts_with(e.as_str())),
            "no line starting {e:?} in:\n{stderr}"
        );
    }
    assert_eq!(lines.len(), expect.len(), "{stderr}");

    // Starting with the same file fails the same way: the messages, no panic, no backtrace.
    let out = Command::new(fanout_bin()).args(["-c", p]).output().unwrap();
    let start_err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        start_err.contains("upstreams.api.backends[1]: invalid address"),
        "{start_err}"
    );
    assert!(
        !start_err.contains("panicked") && !start_err.contains("backtrace"),
        "{start_err}"
    );
    let _ = std::fs::remove_file(&path);
}

#[test]
fn missing_file_and_bad_yaml_are_reported() {
    let (code, _, stderr) = check("/nonexistent/fanout.yaml");
    assert_ne!(code, 0);
    assert!(stderr.contains("cannot read file"), "{stderr}");

    let path = std::env::temp_dir().join(format!("fanout-badyaml-{}.yaml", std::process::id()));
    std::fs::write(&path, "listen: [\"127.0.0.1:1\"\nroutes: {").unwrap();
    let (code, _, stderr) = check(path.to_str().unwrap());
    assert_ne!(code, 0);
    assert!(stderr.contains("invalid YAML"), "{stderr}");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn an_open_admin_listener_without_a_token_is_warned_about() {
    let dir = crate::common::scratch_dir();
    let path = dir.join("open-admin.yaml");
    std::fs::write(
        &path,
        "listen: 127.0.0.1:8080\nadmin: 0.0.0.0:9091\nupstreams:\n  u: { backends: [127.0.0.1:9000] }\n\
         routes:\n  - { match: { prefix: / }, upstream: u }\n",
    )
    .unwrap();
    let (code, stdout, stderr) = check(path.to_str().unwrap());
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), "configuration OK");
    assert!(
        stderr.contains("warning: admin:") && stderr.contains("token_file"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
