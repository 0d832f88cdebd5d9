//! Test harness shared by the integration tests: real HTTP backends (hyper on loopback,
//! each recording what it received and answering as told) and a real `fanout` process
//! started on free loopback ports, waited for with a bound, and killed when dropped.
#![allow(dead_code)]

pub mod h2;
pub mod origin;
pub mod pki;
pub mod raw;
pub mod redis;

#[allow(unused_imports)]
pub use origin::{Handler, Origin};
pub use raw::RawBackend;

use std::io::Write;
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What a backend received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub version: http::Version,
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

pub struct BackendState {
    pub name: String,
    pub hits: AtomicUsize,
    /// What `/health` answers: 200 when true, 503 when false.
    pub healthy: AtomicBool,
    pub delay_ms: AtomicU64,
    pub status: AtomicU16,
    pub inflight: AtomicUsize,
    /// When set, requests are read in full and then the connection is dropped unanswered.
    pub drop_after_body: AtomicBool,
    /// When n > 0, every n-th request is answered 503 instead of `status`.
    pub fail_every: AtomicUsize,
    pub seen: Mutex<Vec<Seen>>,
    /// `/health` requests answered.
    pub health_checks: AtomicUsize,
    /// How many `/health` requests came before the first other one (`usize::MAX`: none yet).
    pub checks_before_first_hit: AtomicUsize,
}

/// A real HTTP/1.1 backend on 127.0.0.1 with an OS-chosen port.
pub struct Backend {
    pub addr: SocketAddr,
    pub state: Arc<BackendState>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        Backend::start_on(name, listener, None)
    }

    /// A backend on `addr` (another loopback address, a given port); `None` when taken.
    pub async fn start_at(name: &str, addr: SocketAddr) -> Option<Backend> {
        let listener = TcpListener::bind(addr).await.ok()?;
        Some(Backend::start_on(name, listener, None))
    }

    /// A backend that speaks TLS with `tls` (h2 or HTTP/1.1, as ALPN says).
    pub async fn start_tls(name: &str, tls: Arc<rustls::ServerConfig>) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        Backend::start_on(name, listener, Some(tls))
    }

    fn start_on(
        name: &str,
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Backend {
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let addr = listener.local_addr().expect("backend addr");
        let state = Arc::new(BackendState {
            name: name.to_string(),
            hits: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            delay_ms: AtomicU64::new(0),
            status: AtomicU16::new(200),
            inflight: AtomicUsize::new(0),
            drop_after_body: AtomicBool::new(false),
            fail_every: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            health_checks: AtomicUsize::new(0),
            checks_before_first_hit: AtomicUsize::new(usize::MAX),
        });
        let tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (st, ts) = (Arc::clone(&state), Arc::clone(&tasks));
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let st = Arc::clone(&st);
                let acceptor = acceptor.clone();
                let conn = tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(Arc::clone(&st), req));
                    match acceptor {
                        None => {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        }
                        Some(acceptor) => {
                            let Ok(tls) = acceptor.accept(stream).await else {
                                return;
                            };
                            let builder = hyper_util::server::conn::auto::Builder::new(
                                hyper_util::rt::TokioExecutor::new(),
                            );
                            let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                        }
                    }
                });
                ts.lock().unwrap().push(conn);
            }
        });
        tasks.lock().unwrap().push(accept);
        Backend { addr, state, tasks }
    }

    pub fn hits(&self) -> usize {
        self.state.hits.load(SeqCst)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.state.healthy.store(healthy, SeqCst);
    }

    pub fn set_delay(&self, ms: u64) {
        self.state.delay_ms.store(ms, SeqCst);
    }

    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, SeqCst);
    }

    /// Every `n`-th request gets 503 (0: none).
    pub fn set_fail_every(&self, n: usize) {
        self.state.fail_every.store(n, SeqCst);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Stops listening and closes every open connection: the backend is gone.
    pub fn kill(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn handle(
    st: Arc<BackendState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    if req.uri().path() == "/health" {
        st.health_checks.fetch_add(1, SeqCst);
        let code = if st.healthy.load(SeqCst) { 200 } else { 503 };
        return Ok(Response::builder()
            .status(code)
            .body(Full::new(Bytes::from_static(b"health")))
            .unwrap());
    }
    st.inflight.fetch_add(1, SeqCst);
    let _ = st.checks_before_first_hit.compare_exchange(
        usize::MAX,
        st.health_checks.load(SeqCst),
        SeqCst,
        SeqCst,
    );
    let method = req.method().to_string();
    let version = req.version();
    let path = req
        .uri()
        .path_and_query()
        .map_or("/".into(), |p| p.to_string());
    let headers = req.headers().clone();
    // A body that never completes (the gateway aborted the request) is not a request received.
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            st.inflight.fetch_sub(1, SeqCst);
            return Ok(Response::builder()
                .status(400)
                .body(Full::new(Bytes::new()))
                .unwrap());
        }
    };
    st.seen.lock().unwrap().push(Seen {
        method,
        version,
        path,
        headers,
        body,
    });
    let hit = st.hits.fetch_add(1, SeqCst) + 1;
    if st.drop_after_body.load(SeqCst) {
        st.inflight.fetch_sub(1, SeqCst);
        return Err(std::io::Error::other("dropping the connection unanswered"));
    }
    let delay = st.delay_ms.load(SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    st.inflight.fetch_sub(1, SeqCst);
    let every = st.fail_every.load(SeqCst);
    let status = if every > 0 && hit.is_multiple_of(every) {
        503
    } else {
        st.status.load(SeqCst)
    };
    Ok(Response::builder()
        .status(status)
        .header("x-backend", st.name.as_str())
        .body(Full::new(Bytes::from(st.name.clone())))
        .unwrap())
}

/// A listener that records every byte it is sent and never answers (a fallback or a
/// mirror that is always too slow), so that what was sent is seen whatever the peer would
/// have done with it. One buffer per connection, in accept order: copies sent at the same
/// time on two connections never run into each other.
pub async fn silent_listener() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>> = Default::default();
    let log = received.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let log = log.clone();
            let slot = {
                let mut all = log.lock().unwrap();
                all.push(Vec::new());
                all.len() - 1
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    log.lock().unwrap()[slot].extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    (addr, received)
}

/// Sends `sig` (`-TERM`, `-QUIT`, `-KILL`, ...) to `pid`.
pub fn signal(pid: u32, sig: &str) {
    assert!(Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

/// A free loopback port (bound then released; the gateway binds it right after). The
/// OS may hand a released port out again, so ports already given to a test of this process
/// are never given twice: parallel tests cannot end up talking to each other's gateway.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    loop {
        let port = StdListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

pub fn scratch_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "fanout-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, SeqCst)
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

pub fn fanout_bin() -> &'static str {
    env!("CARGO_BIN_EXE_fanout")
}

/// Writes the configuration [`Gateway::start`] runs on into `dir`; returns its path.
fn write_conf(dir: &std::path::Path, admin_port: u16, listen: &str, body: &str) -> PathBuf {
    let yaml = format!(
        "server:\n  threads: 2\n  grace_period_seconds: 2\n  graceful_shutdown_timeout_seconds: 1\n  \
         pid_file: {d}/fanout.pid\n  upgrade_sock: {d}/upgrade.sock\n\
         listen: {listen}\nadmin: 127.0.0.1:{admin_port}\n{body}",
        d = dir.display(),
    );
    let conf = dir.join("fanout.yaml");
    // Written beside and renamed into place: a reload never reads half a file.
    let part = dir.join("fanout.yaml.part");
    std::fs::write(&part, yaml).expect("write conf");
    std::fs::rename(&part, &conf).expect("rename conf");
    conf
}

/// A running `fanout` process; killed and cleaned up when dropped.
pub struct Gateway {
    child: Child,
    pub port: u16,
    pub admin_port: u16,
    pub dir: PathBuf,
}

impl Gateway {
    /// Starts fanout on `body` (upstreams, routes, defaults) with its own `server`,
    /// `listen` and `admin` settings on free ports, and waits until both listen.
    pub fn start(body: &str) -> Gateway {
        Gateway::start_listening(|port| format!("[\"127.0.0.1:{port}\"]"), body)
    }

    /// Like [`Gateway::start`], with the `listen:` value that `listen` writes for the port.
    pub fn start_listening(listen: impl Fn(u16) -> String, body: &str) -> Gateway {
        Gateway::launch(|port, admin_port, dir| {
            let conf = write_conf(dir, admin_port, &listen(port), body);
            vec!["-c".to_string(), conf.display().to_string()]
        })
    }

    /// The file [`Gateway::start`] wrote.
    pub fn conf_path(&self) -> PathBuf {
        self.dir.join("fanout.yaml")
    }

    /// Writes the file again with another `listen:` value and body (the `server` and
    /// `admin` settings stay), for a reload.
    pub fn rewrite(&self, listen: &str, body: &str) {
        write_conf(&self.dir, self.admin_port, listen, body);
    }

    /// `fanout --demo` on two free ports (listen, admin).
    pub fn demo() -> Gateway {
        Gateway::spawn_with(|port, admin| {
            vec![
                "--demo".into(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--admin".into(),
                format!("127.0.0.1:{admin}"),
            ]
        })
    }

    /// Starts fanout with `args` built from two free ports (listen, admin).
    pub fn spawn_with(args: impl Fn(u16, u16) -> Vec<String>) -> Gateway {
        Gateway::spawn_env(|_, _| Vec::new(), args)
    }

    /// Like [`Gateway::spawn_with`], with environment variables built from the same ports.
    pub fn spawn_env(
        env: impl Fn(u16, u16) -> Vec<(String, String)>,
        args: impl Fn(u16, u16) -> Vec<String>,
    ) -> Gateway {
        Gateway::launch_env(env, |port, admin_port, _| args(port, admin_port))
    }

    /// Starts fanout with the arguments `make_args` builds from two free ports and a
    /// scratch directory, and waits until both ports listen. A port taken by someone else
    /// in the meantime makes fanout exit at start: it is then tried again on fresh ports.
    fn launch(make_args: impl Fn(u16, u16, &std::path::Path) -> Vec<String>) -> Gateway {
        Gateway::launch_env(|_, _| Vec::new(), make_args)
    }

    /// Like [`Gateway::start`], running `binary` (a program built on the library) instead
    /// of `fanout`.
    pub fn start_binary(binary: &std::path::Path, body: &str) -> Gateway {
        Gateway::launch_binary(
            binary,
            |_, _| Vec::new(),
            |port, admin_port, dir| {
                let conf = write_conf(dir, admin_port, &format!("[\"127.0.0.1:{port}\"]"), body);
                vec!["-c".to_string(), conf.display().to_string()]
            },
        )
    }

    fn launch_env(
        make_env: impl Fn(u16, u16) -> Vec<(String, String)>,
        make_args: impl Fn(u16, u16, &std::path::Path) -> Vec<String>,
    ) -> Gateway {
        Gateway::launch_binary(std::path::Path::new(fanout_bin()), make_env, make_args)
    }

    fn launch_binary(
        binary: &std::path::Path,
        make_env: impl Fn(u16, u16) -> Vec<(String, String)>,
        make_args: impl Fn(u16, u16, &std::path::Path) -> Vec<String>,
    ) -> Gateway {
        let mut last = String::new();
        for _ in 0..3 {
            let (port, admin_port, dir) = (free_port(), free_port(), scratch_dir());
            let args = make_args(port, admin_port, &dir);
            let file =
                |name: &str| Stdio::from(std::fs::File::create(dir.join(name)).expect("log file"));
            let child = Command::new(binary)
                .args(&args)
                .envs(make_env(port, admin_port))
                .stdout(file("stdout"))
                .stderr(file("stderr"))
                .spawn()
                .expect("spawn fanout");
            let mut gw = Gateway {
                child,
                port,
                admin_port,
                dir,
            };
            match gw.wait_listening(&[port, admin_port]) {
                Ok(()) => return gw,
                Err(e) => last = e,
            }
        }
        panic!("fanout did not start: {last}");
    }

    /// Waits (at most 15 s) until every port accepts connections.
    fn wait_listening(&mut self, ports: &[u16]) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        for &p in ports {
            while TcpStream::connect(("127.0.0.1", p)).is_err() {
                if let Ok(Some(status)) = self.child.try_wait() {
                    return Err(format!(
                        "fanout exited early ({status}):\n{}",
                        self.stderr()
                    ));
                }
                if Instant::now() > deadline {
                    return Err(format!("fanout did not listen on {p}:\n{}", self.stderr()));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has exited (reaping it), waiting at most `limit`.
    pub fn exited_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join("stdout")).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("fanout stderr:\n{}", self.stderr());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// Polls `check` every 20 ms until it holds, failing the test after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`eventually`] for tests that are not async: polls `check` every 20 ms, failing the
/// test after `limit`.
pub fn eventually_blocking(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// GET `url` and return (status, x-backend header, body).
pub async fn get(c: &reqwest::Client, url: &str) -> (u16, String, String) {
    let resp = c.get(url).send().await.expect("request");
    let status = resp.status().as_u16();
    let backend = resp
        .headers()
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (status, backend, resp.text().await.unwrap_or_default())
}

/// Sends raw bytes on a fresh connection and reads until the server closes it or 5 s pass.
/// Returns what was read and whether the server closed the connection.
pub fn raw(port: u16, request: &[u8]) -> (String, bool) {
    use std::io::Read;
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s.write_all(request).expect("write");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (String::from_utf8_lossy(&out).into_owned(), true)
            }
            Err(_) => {}
        }
        if Instant::now() > deadline {
            return (String::from_utf8_lossy(&out).into_owned(), false);
        }
    }
}

/// Waits (at most 5 s) for a line of the gateway's stdout containing `needle`.
pub async fn stdout_line(gw: &Gateway, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(line) = gw.stdout().lines().find(|l| l.contains(needle)) {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no stdout line with {needle:?}:\n{}",
            gw.stdout()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The admin listener's `/metrics` text.
pub async fn metrics_text(c: &reqwest::Client, gw: &Gateway) -> String {
    c.get(gw.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of one metric series, written as `/metrics` prints it (name and labels in
/// alphabetical order). A series that is not there fails the test: a renamed metric or
/// label must not pass as a zero.
pub async fn metric(c: &reqwest::Client, gw: &Gateway, series: &str) -> u64 {
    let prefix = format!("{series} ");
    let text = metrics_text(c, gw).await;
    let value = text.lines().find_map(|l| l.strip_prefix(prefix.as_str()));
    match value {
        Some(v) => v.trim().parse().unwrap(),
        None => panic!("no series {series} in /metrics:\n{text}"),
    }
}

/// The admin listener's `/status` JSON.
pub async fn status_json(c: &reqwest::Client, gw: &Gateway) -> serde_json::Value {
    admin_json(c, gw, "/status").await
}

/// The JSON the admin listener answers `GET path` with.
pub async fn admin_json(c: &reqwest::Client, gw: &Gateway, path: &str) -> serde_json::Value {
    c.get(gw.admin_url(path))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `template` with every `{P}` replaced by `path` (the marker of a table row's request).
pub fn fill(template: &[u8], path: &str) -> Vec<u8> {
    let text = template.to_vec();
    let mut out = Vec::with_capacity(text.len() + path.len());
    let mut i = 0;
    while i < text.len() {
        if text[i..].starts_with(b"{P}") {
            out.extend_from_slice(path.as_bytes());
            i += 3;
        } else {
            out.push(text[i]);
            i += 1;
        }
    }
    out
}

/// Waits (bounded by `limit`) until `b` has received a request with each of `ids` as its
/// `X-Request-Id` (broadcast deliveries, which come in the background).
pub async fn wait_all_received(b: &Backend, ids: &[String], limit: Duration) {
    let want: std::collections::HashSet<&String> = ids.iter().collect();
    let deadline = Instant::now() + limit;
    loop {
        let got: std::collections::HashSet<String> = b
            .seen()
            .iter()
            .filter_map(|s| {
                s.headers
                    .get("x-request-id")?
                    .to_str()
                    .ok()
                    .map(String::from)
            })
            .collect();
        let missing = want.iter().filter(|id| !got.contains(**id)).count();
        if missing == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} accepted events never arrived",
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `fanout -t` on `yaml` written to a scratch file: whether it passed, and what it printed
/// (stderr, then stdout).
pub fn check_yaml(yaml: &str) -> (bool, String) {
    check_yaml_with(std::path::Path::new(fanout_bin()), yaml)
}

/// [`check_yaml`] with another binary built on the library.
pub fn check_yaml_with(binary: &std::path::Path, yaml: &str) -> (bool, String) {
    let dir = scratch_dir();
    let conf = dir.join("fanout.yaml");
    std::fs::write(&conf, yaml).expect("write conf");
    let out = Command::new(binary)
        .args(["-t", "-c", &conf.display().to_string()])
        .output()
        .expect("fanout -t");
    let _ = std::fs::remove_dir_all(&dir);
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    (out.status.success(), text)
}
