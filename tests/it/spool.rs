//! Broadcast that loses nothing: a flaky target still gets every event (retries with the
//! same Idempotency-Key), deliveries left at SIGTERM, at `kill -9` and across a graceful
//! upgrade under load all arrive from the spool, a full spool answers 503, and what is
//! given up (too many attempts, too old, rejected with a 4xx) is counted and logged.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;

fn count_series(route: &str, upstream: &str, outcome: &str) -> String {
    format!("fanout_broadcast_deliveries_total{{outcome=\"{outcome}\",route=\"{route}\",upstream=\"{upstream}\"}}")
}

/// Upstreams and one broadcast route `events` to them, with a spool in `spool`.
fn body(spool: &Path, targets: &[(&str, std::net::SocketAddr)], extra: &str) -> String {
    let ups: String = targets
        .iter()
        .map(|(n, a)| format!("  {n}: {{ backends: [{a}] }}\n"))
        .collect();
    let names: Vec<&str> = targets.iter().map(|(n, _)| *n).collect();
    format!(
        "spool: {{ dir: {} }}\ndefaults: {{ access_log: off }}\nupstreams:\n{ups}\
         routes:\n  - name: events\n    match: {{ prefix: /events }}\n    broadcast: [{}]\n{extra}",
        spool.display(),
        names.join(", ")
    )
}

/// POSTs `n` events (`concurrency` at a time) with ids `{prefix}-{i}`; returns the ids
/// answered 202.
async fn post_events(port: u16, prefix: &str, n: usize, concurrency: usize) -> Vec<String> {
    let c = client();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (c, next, accepted) = (c.clone(), Arc::clone(&next), Arc::clone(&accepted));
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, SeqCst);
                if i >= n {
                    return;
                }
                let id = format!("{prefix}-{i}");
                let resp = c
                    .post(format!("http://127.0.0.1:{port}/events"))
                    .header("x-request-id", &id)
                    .body(format!("{{\"event\":{i}}}"))
                    .send()
                    .await
                    .expect("an answer");
                assert_eq!(resp.status(), 202, "{id}");
                accepted.lock().unwrap().push(id);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let ids = accepted.lock().unwrap().clone();
    ids
}

/// The request ids `b` received, with how many times each came.
fn received(b: &Backend) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for s in b.seen() {
        let id = s.headers["x-request-id"].to_str().unwrap().to_string();
        *out.entry(id).or_insert(0) += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_failing_one_time_in_five_still_gets_every_event() {
    let (flaky, steady) = (
        Backend::start("flaky").await,
        Backend::start("steady").await,
    );
    flaky.set_fail_every(5);
    let spool = scratch_dir();
    let gw = Gateway::start(&body(
        &spool,
        &[("flaky", flaky.addr), ("steady", steady.addr)],
        "",
    ));
    let ids = post_events(gw.port, "ev", 200, 8).await;
    assert_eq!(ids.len(), 200);
    wait_all_received(&flaky, &ids, Duration::from_secs(30)).await;
    wait_all_received(&steady, &ids, Duration::from_secs(5)).await;
    let c = client();
    eventually(
        Duration::from_secs(10),
        "every delivery counted ok",
        || async { metric(&c, &gw, &count_series("events", "flaky", "ok")).await == 200 },
    )
    .await;
    assert!(metric(&c, &gw, &count_series("events", "flaky", "retried")).await >= 40);
    assert_eq!(
        metric(&c, &gw, &count_series("events", "steady", "retried")).await,
        0
    );
    // Every attempt of one event carried the same Idempotency-Key; events differ.
    let mut keys: HashMap<String, HashSet<String>> = HashMap::new();
    for s in flaky.seen() {
        let id = s.headers["x-request-id"].to_str().unwrap().to_string();
        let key = s.headers["idempotency-key"].to_str().unwrap().to_string();
        keys.entry(id).or_default().insert(key);
    }
    assert!(keys.values().all(|k| k.len() == 1));
    let distinct: HashSet<&String> = keys.values().flatten().collect();
    assert_eq!(distinct.len(), 200);
    // Everything done: nothing pending, nothing old.
    eventually(
        Duration::from_secs(5),
        "the spool gauges at zero",
        || async { metric(&c, &gw, "fanout_spool_bytes{upstream=\"flaky\"}").await == 0 },
    )
    .await;
    let _ = std::fs::remove_dir_all(&spool);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_sigterm_leaves_is_delivered_after_the_restart() {
    let slow = Backend::start("slow").await;
    slow.set_delay(500);
    let spool = scratch_dir();
    let conf = body(&spool, &[("slow", slow.addr)], "");
    let mut first = Gateway::start(&conf);
    let ids = post_events(first.port, "term", 1000, 32).await;
    assert_eq!(ids.len(), 1000);
    signal(first.pid(), "-TERM");
    assert!(
        first.exited_within(Duration::from_secs(15)),
        "SIGTERM ends it"
    );
    let before = received(&slow).len();
    assert!(
        before < 1000,
        "all delivered before the stop: make the target slower"
    );
    let _second = Gateway::start(&conf);
    wait_all_received(&slow, &ids, Duration::from_secs(60)).await;
    // Duplicates only from what was in flight at the stop.
    let got = received(&slow);
    let extra: usize = got.values().map(|n| n - 1).sum();
    assert!(extra <= 64, "{extra} duplicates");
    eprintln!("{before} delivered before SIGTERM, the rest after the restart; {extra} duplicates");
    let _ = std::fs::remove_dir_all(&spool);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_202_before_a_kill_9_is_delivered_after_the_restart() {
    let slow = Backend::start("slow").await;
    slow.set_delay(200);
    let spool = scratch_dir();
    let conf = body(&spool, &[("slow", slow.addr)], "");
    let mut first = Gateway::start(&conf);
    let ids = post_events(first.port, "kill", 300, 16).await;
    signal(first.pid(), "-KILL");
    assert!(first.exited_within(Duration::from_secs(5)));
    assert!(received(&slow).len() < 300);
    let _second = Gateway::start(&conf);
    wait_all_received(&slow, &ids, Duration::from_secs(60)).await;
    let _ = std::fs::remove_dir_all(&spool);
}

/// fanout processes sharing one configuration (one port, one upgrade socket).
struct Shared {
    dir: std::path::PathBuf,
    conf: std::path::PathBuf,
    port: u16,
    children: Vec<Child>,
}

impl Shared {
    fn spawn(&mut self, args: &[&str]) -> u32 {
        let n = self.children.len();
        let file = |name: String| Stdio::from(std::fs::File::create(self.dir.join(name)).unwrap());
        let child = Command::new(fanout_bin())
            .args(args)
            .arg("-c")
            .arg(&self.conf)
            .stdout(file(format!("stdout-{n}")))
            .stderr(file(format!("stderr-{n}")))
            .spawn()
            .unwrap();
        let pid = child.id();
        self.children.push(child);
        pid
    }

    fn stderr(&self) -> String {
        (0..self.children.len())
            .map(|n| {
                std::fs::read_to_string(self.dir.join(format!("stderr-{n}"))).unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n---\n")
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("fanout stderr:\n{}", self.stderr());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_upgrade_under_broadcast_load_loses_nothing() {
    let slow = Backend::start("slow").await;
    slow.set_delay(200);
    let dir = scratch_dir();
    let spool = dir.join("spool");
    let port = free_port();
    let conf = dir.join("fanout.yaml");
    let d = dir.display();
    std::fs::write(
        &conf,
        format!(
            "server:\n  threads: 2\n  pid_file: {d}/fanout.pid\n  upgrade_sock: {d}/upgrade.sock\n  \
             grace_period_seconds: 2\n  graceful_shutdown_timeout_seconds: 1\n\
             listen: [\"127.0.0.1:{port}\"]\n{}",
            body(&spool, &[("slow", slow.addr)], "")
        ),
    )
    .unwrap();
    let mut procs = Shared {
        dir: dir.clone(),
        conf,
        port,
        children: Vec::new(),
    };
    let old = procs.spawn(&[]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", procs.port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "fanout did not start:\n{}",
            procs.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Keep-alive clients posting events until stopped; every id answered 202 is kept.
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let mut load = Vec::new();
    for client_no in 0..8 {
        let (stop, accepted, failures) = (
            Arc::clone(&stop),
            Arc::clone(&accepted),
            Arc::clone(&failures),
        );
        let url = format!("http://127.0.0.1:{port}/events");
        load.push(tokio::spawn(async move {
            let c = client();
            let mut i = 0;
            while !stop.load(SeqCst) {
                let id = format!("up-{client_no}-{i}");
                i += 1;
                match c
                    .post(&url)
                    .header("x-request-id", &id)
                    .body("{}")
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 202 => accepted.lock().unwrap().push(id),
                    Ok(r) => failures
                        .lock()
                        .unwrap()
                        .push(format!("{id}: {}", r.status())),
                    Err(e) => failures.lock().unwrap().push(format!("{id}: {e:?}")),
                }
                // About 400 events a second in all, more than the target takes (64 at a
                // time, 200 ms each): a backlog builds, which the hand-over must carry.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // As the systemd unit's ExecReload does: SIGQUIT the old process, start the new one.
    signal(old, "-QUIT");
    procs.spawn(&["-u"]);
    tokio::time::sleep(Duration::from_millis(3000)).await;
    stop.store(true, SeqCst);
    for t in load {
        t.await.unwrap();
    }
    let ids = accepted.lock().unwrap().clone();
    let failures = failures.lock().unwrap().clone();
    assert!(ids.len() > 100, "only {} accepted", ids.len());
    assert!(
        failures.is_empty(),
        "{} requests failed across the upgrade: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    wait_all_received(&slow, &ids, Duration::from_secs(60)).await;
    // The old process handed the spool over; the new one delivered from it.
    let log = procs.stderr();
    let (old_log, new_log) = log.split_once("\n---\n").unwrap_or_default();
    let pending: usize = old_log
        .split("broadcast: spool handed over (")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no hand-over logged:\n{log}"));
    assert!(pending > 0, "nothing was pending at the hand-over");
    assert!(
        new_log.contains("broadcast: delivering from the spool"),
        "{log}"
    );
    let got = received(&slow);
    let extra: usize = got.values().map(|n| n - 1).sum();
    assert!(extra <= 64, "{extra} duplicates");
    eprintln!(
        "upgrade: {} events accepted, {pending} pending at the hand-over, all delivered, {extra} twice",
        ids.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_answers_503() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let spool = scratch_dir();
    let gw = Gateway::start(&format!(
        "{}\n",
        body(&spool, &[("gone", dead_addr)], "").replace(
            &format!("spool: {{ dir: {} }}", spool.display()),
            &format!("spool: {{ dir: {}, max_size: 1MiB }}", spool.display())
        )
    ));
    let c = client();
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..30 {
        let resp = c
            .post(gw.url("/events"))
            .header("x-request-id", format!("full-{i}"))
            .body(vec![b'x'; 100 * 1024])
            .send()
            .await
            .unwrap();
        match resp.status().as_u16() {
            202 => accepted += 1,
            503 => {
                assert_eq!(resp.headers()["retry-after"], "1");
                let v: serde_json::Value = resp.json().await.unwrap();
                assert_eq!(v["error"], "broadcast spool is full");
                refused += 1;
            }
            other => panic!("status {other}"),
        }
    }
    assert!((8..=10).contains(&accepted), "{accepted} accepted");
    assert_eq!(accepted + refused, 30);
    let _ = std::fs::remove_dir_all(&spool);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_given_up_is_counted_and_logged() {
    let (down, old, nope) = (
        Backend::start("down").await,
        Backend::start("old").await,
        Backend::start("nope").await,
    );
    down.set_status(503);
    old.set_status(503);
    nope.set_status(404);
    let spool = scratch_dir();
    let gw = Gateway::start(&format!(
        "spool: {{ dir: {} }}\nupstreams:\n  down: {{ backends: [{}] }}\n  old: {{ backends: [{}] }}\n  nope: {{ backends: [{}] }}\n\
         routes:\n\
         \x20 - {{ name: attempts, match: {{ prefix: /a }}, broadcast: [down, nope], broadcast_retry: {{ max_attempts: 3 }} }}\n\
         \x20 - {{ name: age, match: {{ prefix: /b }}, broadcast: [old], broadcast_retry: {{ max_age: 1s }} }}\n",
        spool.display(),
        down.addr,
        old.addr,
        nope.addr
    ));
    let c = client();
    for (path, id) in [("/a", "give-up-a"), ("/b", "give-up-b")] {
        let r = c
            .post(gw.url(path))
            .header("x-request-id", id)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    eventually(Duration::from_secs(15), "every give-up counted", || async {
        metric(&c, &gw, &count_series("attempts", "down", "expired")).await == 1
            && metric(&c, &gw, &count_series("attempts", "nope", "rejected")).await == 1
            && metric(&c, &gw, &count_series("age", "old", "expired")).await == 1
    })
    .await;
    assert_eq!(down.hits(), 3, "max_attempts: 3");
    assert_eq!(nope.hits(), 1, "a 404 is not retried");
    assert!(old.hits() >= 1);
    let log = gw.stderr();
    assert!(
        log.contains("gave up request give-up-a for down of route attempts after 3 attempts"),
        "{log}"
    );
    assert!(
        log.contains("gave up request give-up-b for old of route age"),
        "{log}"
    );
    assert!(
        log.contains("nope rejected request give-up-a of route attempts with 404"),
        "{log}"
    );
    // Given up is done: the spool forgets it.
    eventually(Duration::from_secs(5), "nothing pending", || async {
        let s = status_json(&c, &gw).await;
        s["routes"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r["targets"].as_array().cloned().unwrap_or_default())
            .all(|t| t["pending"] == 0)
    })
    .await;
    let _ = std::fs::remove_dir_all(&spool);
}
