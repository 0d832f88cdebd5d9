//! The control socket: a Unix socket beside `server.upgrade_sock` (its path plus
//! `.control`, mode 0600) through which `fanout reload` asks the running process to reload
//! and learns the outcome, its process id and its command line (to start its successor
//! when an upgrade is needed). One JSON line each way. Only the process's own user (or
//! root) can open it; a graceful upgrade's new process takes the path over.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::Reloader;

/// The longest a request line may be, and the longest a client may take to send it.
const MAX_REQUEST: u64 = 64 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The control socket of the process whose `server.upgrade_sock` is `upgrade_sock`.
pub fn socket_path(upgrade_sock: &str) -> PathBuf {
    PathBuf::from(format!("{upgrade_sock}.control"))
}

pub struct Control {
    reloader: Arc<Reloader>,
    path: PathBuf,
}

impl Control {
    pub fn new(reloader: Arc<Reloader>, path: PathBuf) -> Control {
        Control { reloader, path }
    }
}

fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    // A predecessor's (or a crashed process's) socket: this process answers from now on.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

#[async_trait]
impl BackgroundService for Control {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let listener = match bind(&self.path) {
            Ok(l) => l,
            Err(e) => {
                log::warn!(
                    "control socket {}: {e}; `fanout reload` cannot reach this process (SIGHUP and POST /reload still reload)",
                    self.path.display()
                );
                return;
            }
        };
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let reloader = Arc::clone(&self.reloader);
                    tokio::spawn(async move {
                        if let Err(e) = serve(stream, &reloader).await {
                            log::debug!("control socket: {e}");
                        }
                    });
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// What the process says of itself with every answer.
fn whoami(reloader: &Reloader) -> Value {
    json!({
        "pid": std::process::id(),
        "argv": std::env::args().collect::<Vec<_>>(),
        "exe": reloader.history.binary_path(),
        "generation": reloader.gw.peek().number,
    })
}

async fn serve(stream: UnixStream, reloader: &Arc<Reloader>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::other("no request in time"))??;
    let request: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
    let mut answer = whoami(reloader);
    match request["op"].as_str() {
        Some("status") => {}
        Some("reload") => {
            let file = request["file"].as_str().map(PathBuf::from);
            let outcome = reloader.reload(file).await;
            if let (Value::Object(a), Value::Object(o)) = (&mut answer, outcome.to_json()) {
                a.extend(o);
            }
            answer["generation"] = json!(reloader.gw.peek().number);
        }
        _ => answer["error"] = json!("unknown request: expected {\"op\": \"reload\" | \"status\"}"),
    }
    let mut out = answer.to_string();
    out.push('\n');
    write.write_all(out.as_bytes()).await?;
    write.shutdown().await
}

/// Sends `request` to the process at `path` and returns its answer (blocking; bounded by
/// `timeout` in all).
pub fn ask(path: &Path, request: &Value, timeout: Duration) -> Result<Value, String> {
    use std::io::{BufRead, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(path)
        .map_err(|e| format!("no fanout answers at {}: {e}", path.display()))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|_| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    let mut line = request.to_string();
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut answer = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(|e| format!("{}: no answer: {e}", path.display()))?;
    serde_json::from_str(&answer).map_err(|e| format!("{}: unreadable answer: {e}", path.display()))
}
