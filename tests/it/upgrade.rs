//! Zero-downtime operations: a daemonized fanout upgraded the way the systemd unit's
//! ExecReload does it (check, SIGQUIT the old process, start the new one with -u) under
//! keep-alive load from real clients, with zero failed requests; a broken new
//! configuration leaves the old process serving; SIGTERM lets in-flight requests finish; a
//! TLS listener's new certificate takes over through the same upgrade, under HTTPS load.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::pki;
use crate::common::*;

/// A daemonized fanout, identified by its pid file; whatever runs is killed on drop.
struct Daemon {
    dir: PathBuf,
    conf: PathBuf,
    port: u16,
}

impl Daemon {
    fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("fanout.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Runs fanout with `args` and waits for the launcher (not the daemon) to exit.
    fn run(&self, args: &[&str]) -> (bool, String) {
        let log = self
            .dir
            .join(format!("launcher-{}.log", args.join("_").replace('/', "")));
        let file = std::fs::File::create(&log).unwrap();
        let status = Command::new(fanout_bin())
            .args(args)
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .status()
            .expect("run fanout");
        (
            status.success(),
            std::fs::read_to_string(&log).unwrap_or_default(),
        )
    }

    fn start(backend: &Backend) -> Daemon {
        Daemon::start_in(scratch_dir(), backend, |port| {
            format!("[\"127.0.0.1:{port}\"]")
        })
    }

    /// Starts a daemon whose `listen:` is what `listen` writes for its port.
    fn start_in(dir: PathBuf, backend: &Backend, listen: impl Fn(u16) -> String) -> Daemon {
        let port = free_port();
        let conf = write_conf_listening(
            &dir,
            "fanout.yaml",
            &listen(port),
            &backend.addr.to_string(),
        );
        let d = Daemon { dir, conf, port };
        let (ok, out) = d.run(&["-d", "-c", d.conf.to_str().unwrap()]);
        assert!(ok, "fanout -d failed: {out}");
        eventually_blocking(Duration::from_secs(10), "daemon pid file and port", || {
            d.pid().is_some() && std::net::TcpStream::connect(("127.0.0.1", d.port)).is_ok()
        });
        d
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write_conf_listening(dir: &Path, name: &str, listen: &str, backend: &str) -> PathBuf {
    let d = dir.display();
    let text = format!(
        "server:\n  threads: 2\n  pid_file: {d}/fanout.pid\n  upgrade_sock: {d}/upgrade.sock\n  \
         grace_period_seconds: 1\n  graceful_shutdown_timeout_seconds: 1\n\
         listen: {listen}\ndefaults: {{ access_log: off }}\n\
         upstreams:\n  u: {{ backends: [{backend}] }}\nroutes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n"
    );
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn alive(pid: u32) -> bool {
    Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Keep-alive clients hammering the gateway until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(port: u16, clients: usize) -> Load {
        Load::start_with(client(), format!("http://127.0.0.1:{port}/load"), clients)
    }

    /// `clients` tasks sending GET `url` with clones of `c`.
    fn start_with(c: reqwest::Client, url: String, clients: usize) -> Load {
        let (stop, ok, failed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let tasks = (0..clients)
            .map(|_| {
                let (stop, ok, failed) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
                let (c, url) = (c.clone(), url.clone());
                tokio::spawn(async move {
                    let mut errors = Vec::new();
                    while !stop.load(SeqCst) {
                        let result = match c.get(&url).send().await {
                            Ok(r) if r.status() == 200 => {
                                r.text().await.map(|_| ()).map_err(|e| format!("{e:?}"))
                            }
                            Ok(r) => Err(format!("status {}", r.status())),
                            Err(e) => Err(format!("{e:?}")),
                        };
                        match result {
                            Ok(()) => ok.fetch_add(1, SeqCst),
                            Err(e) => {
                                errors.push(e);
                                failed.fetch_add(1, SeqCst)
                            }
                        };
                    }
                    errors
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    async fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, SeqCst);
        let mut errors = Vec::new();
        for t in self.tasks {
            errors.extend(t.await.unwrap());
        }
        (self.ok.load(SeqCst), self.failed.load(SeqCst), errors)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_under_load_fails_no_request() {
    let backend = Backend::start("b").await;
    let d = Daemon::start(&backend);
    let old = d.pid().unwrap();
    let load = Load::start(d.port, 16);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // ExecReload, in order: check, SIGQUIT the running process, start the new one.
    let conf = d.conf.to_str().unwrap().to_string();
    let (ok, out) = d.run(&["-t", "-c", &conf]);
    assert!(ok, "{out}");
    let started = Instant::now();
    signal(old, "-QUIT");
    let (ok, out) = d.run(&["-u", "-d", "-c", &conf]);
    assert!(ok, "fanout -u -d failed: {out}");
    let handover = started.elapsed();
    // The daemon writes its pid file after the launcher returns (truncating it first):
    // wait for it to name the new process.
    eventually_blocking(
        Duration::from_secs(5),
        "the pid file names the new process",
        || d.pid().is_some_and(|p| p != old),
    );
    let new = d.pid().unwrap_or_default();

    // The old process finishes its work and exits (about 5 s + grace + shutdown timeout).
    let d_ref = &d;
    tokio::task::spawn_blocking(move || {
        eventually_blocking(Duration::from_secs(15), "old process exit", || !alive(old))
    })
    .await
    .unwrap();
    let old_gone = started.elapsed();
    let served_before = load.ok.load(SeqCst);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (ok, failed, errors) = load.finish().await;
    assert_eq!(
        failed,
        0,
        "{failed} failed requests across the upgrade: {:?}",
        &errors[..errors.len().min(5)]
    );
    assert!(
        ok > served_before,
        "the new process served nothing after the old one exited"
    );
    assert!(alive(new));
    assert!(d_ref.pid() == Some(new));
    eprintln!("upgrade: {ok} requests, {failed} failed; handover {handover:?}; old process gone after {old_gone:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_new_configuration_leaves_the_old_process_serving() {
    let backend = Backend::start("b").await;
    let d = Daemon::start(&backend);
    let old = d.pid().unwrap();
    let load = Load::start(d.port, 8);
    let broken = d.dir.join("broken.yaml");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&d.conf)
            .unwrap()
            .replace("backends: [", "backends: [x:y, "),
    )
    .unwrap();
    let broken = broken.to_str().unwrap().to_string();

    // The unit's first ExecReload step fails, so the reload stops there...
    let (ok, out) = d.run(&["-t", "-c", &broken]);
    assert!(!ok);
    assert!(
        out.contains("upstreams.u.backends[0]: invalid address \"x:y\""),
        "{out}"
    );
    // ...and even run directly, the new process checks before asking for the sockets.
    let (ok, out) = d.run(&["-u", "-d", "-c", &broken]);
    assert!(!ok, "an upgrade with a broken file went ahead");
    assert!(out.contains("invalid address"), "{out}");

    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (ok, failed, _) = load.finish().await;
    assert_eq!(failed, 0);
    assert!(ok > 0);
    assert!(alive(old));
    assert_eq!(d.pid(), Some(old));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish() {
    let backend = Backend::start("slow").await;
    backend.set_delay(700);
    let mut gw = Gateway::start(&format!(
        "upstreams:\n  u: {{ backends: [{}] }}\nroutes:\n  - {{ match: {{ prefix: / }}, upstream: u }}\n",
        backend.addr
    ));
    let pid = gw.pid();
    let c = client();
    let url = gw.url("/slow");
    let inflight =
        tokio::spawn(async move { c.get(url).send().await.map(|r| r.status().as_u16()) });
    eventually(
        Duration::from_secs(5),
        "the request at the backend",
        || async {
            backend
                .state
                .inflight
                .load(std::sync::atomic::Ordering::SeqCst)
                == 1
        },
    )
    .await;
    signal(pid, "-TERM");
    let status = inflight
        .await
        .unwrap()
        .expect("the in-flight request was cut");
    assert_eq!(status, 200);
    let exited = tokio::task::spawn_blocking(move || gw.exited_within(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(exited, "fanout did not exit after SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_with_new_certificates_fails_no_request() {
    let dir = scratch_dir();
    let ca = pki::Ca::new(&dir, "upgrade");
    let (before, after) = (
        ca.issue(&dir, "before", &["a.test"]),
        ca.issue(&dir, "after", &["a.test"]),
    );
    let backend = Backend::start("b").await;
    let tls_listen = |cert: &pki::Issued, port: u16| {
        format!(
            "[{{ address: \"127.0.0.1:{port}\", tls: {{ certificates: [{{ cert: {}, key: {} }}] }} }}]",
            cert.cert.display(),
            cert.key.display()
        )
    };
    let d = Daemon::start_in(dir.clone(), &backend, |port| tls_listen(&before, port));
    let served = |port: u16| {
        let connector = tokio_rustls::TlsConnector::from(ca.client_config(&[]));
        async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            let name = rustls::pki_types::ServerName::try_from("a.test").unwrap();
            let tls = connector.connect(name, tcp).await.expect("handshake");
            tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
        }
    };
    assert_eq!(served(d.port).await, before.der);
    let https = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca.reqwest_root())
        .resolve(
            "a.test",
            std::net::SocketAddr::from(([127, 0, 0, 1], d.port)),
        )
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let old = d.pid().unwrap();
    let load = Load::start_with(https, format!("https://a.test:{}/load", d.port), 8);
    tokio::time::sleep(Duration::from_millis(1000)).await;

    // The new certificate goes into the file, then the reload: check, SIGQUIT, -u.
    let conf = write_conf_listening(
        &d.dir,
        "fanout.yaml",
        &tls_listen(&after, d.port),
        &backend.addr.to_string(),
    );
    let conf = conf.to_str().unwrap().to_string();
    let (ok, out) = d.run(&["-t", "-c", &conf]);
    assert!(ok, "{out}");
    signal(old, "-QUIT");
    let (ok, out) = d.run(&["-u", "-d", "-c", &conf]);
    assert!(ok, "fanout -u -d failed: {out}");
    tokio::task::spawn_blocking(move || {
        eventually_blocking(Duration::from_secs(15), "old process exit", || !alive(old))
    })
    .await
    .unwrap();
    assert_eq!(
        served(d.port).await,
        after.der,
        "new handshakes get the new certificate"
    );
    let (ok, failed, errors) = load.finish().await;
    assert_eq!(
        failed,
        0,
        "{failed} failed across the upgrade: {:?}",
        &errors[..errors.len().min(5)]
    );
    assert!(ok > 0);
}
