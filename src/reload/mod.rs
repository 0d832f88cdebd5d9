//! Reloading the configuration in place. SIGHUP, `POST /reload` and `fanout reload` (through
//! the [`control`] socket) all come to [`Reloader::reload`]: the file is read and checked exactly as
//! `-t` checks it, the changes that cannot be made in a running process are named (the
//! listeners, `server:`, the admin address, the spool, the resolver, the cache's size, a
//! new binary on disk), and otherwise the next [`Generation`] is built beside the one in
//! force — taking over, by identity, what the gateway has learned — and swapped in, with
//! the client policy, the connection limits and the listeners' certificates. A file with
//! an error changes nothing. [`command`] is the `fanout reload` command, which also
//! performs the graceful upgrade when the running process says one is needed.

pub mod command;
pub mod control;

use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use serde_json::{json, Value};
use tokio::signal::unix::{signal, SignalKind};

use crate::config;
use crate::gateway::{Gateway, Generation};

/// What a reload came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The file is in force as this generation.
    Applied { generation: u64 },
    /// The file has errors (one line each): nothing changed.
    Refused(Vec<String>),
    /// The file is valid but these changes need a new process (one line each): nothing
    /// changed; `fanout reload` performs the graceful upgrade.
    NeedsUpgrade(Vec<String>),
}

impl ReloadOutcome {
    /// The `result` label of `fanout_config_reloads_total`.
    pub fn result(&self) -> &'static str {
        match self {
            ReloadOutcome::Applied { .. } => "ok",
            ReloadOutcome::Refused(_) => "error",
            ReloadOutcome::NeedsUpgrade(_) => "upgrade",
        }
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({ "result": self.result() });
        match self {
            ReloadOutcome::Applied { generation } => v["generation"] = json!(generation),
            ReloadOutcome::Refused(l) => v["errors"] = json!(l),
            ReloadOutcome::NeedsUpgrade(l) => v["needs_upgrade"] = json!(l),
        }
        v
    }
}

/// The binary a process was started from: its path and what it was on disk then.
struct Binary {
    path: PathBuf,
    identity: Option<(u64, u64, SystemTime)>,
}

fn identity(path: &Path) -> Option<(u64, u64, SystemTime)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.modified().ok()?))
}

/// The last reload: when, and how it ended.
#[derive(Debug, Clone)]
pub struct Last {
    pub at: SystemTime,
    pub outcome: ReloadOutcome,
}

/// Where the configuration comes from, and how reloads went.
#[derive(Default)]
pub struct History {
    /// One reload at a time.
    running: Mutex<()>,
    /// The file the configuration is read from (none in quick mode and the demo).
    file: Mutex<Option<PathBuf>>,
    binary: OnceLock<Binary>,
    last: Mutex<Option<Last>>,
}

impl History {
    /// Notes the file the process started from and the binary it runs.
    pub fn started(&self, file: Option<PathBuf>) {
        *self.file.lock() = file.map(|f| std::path::absolute(&f).unwrap_or(f));
        let path = std::env::current_exe().unwrap_or_default();
        let _ = self.binary.set(Binary {
            identity: identity(&path),
            path,
        });
    }

    pub fn file(&self) -> Option<PathBuf> {
        self.file.lock().clone()
    }

    /// The binary the process was started from (where its successor is found).
    pub fn binary_path(&self) -> Option<String> {
        self.binary.get().map(|b| b.path.display().to_string())
    }

    pub fn last(&self) -> Option<Last> {
        self.last.lock().clone()
    }

    /// Whether the binary on disk is no longer the one running.
    fn binary_replaced(&self) -> Option<String> {
        let b = self.binary.get()?;
        let now = identity(&b.path);
        (b.identity.is_some() && now != b.identity).then(|| {
            format!(
                "the binary on disk ({}) is not the one running",
                b.path.display()
            )
        })
    }
}

/// What reloads the gateway: the gateway and how its reloads went. SIGHUP, `POST /reload`
/// and the control socket all hold one.
pub struct Reloader {
    pub gw: Arc<Gateway>,
    pub history: History,
}

impl Reloader {
    pub fn new(gw: Arc<Gateway>) -> Reloader {
        Reloader {
            gw,
            history: History::default(),
        }
    }

    /// [`reload`] off the async workers (it reads files).
    pub async fn reload(self: &Arc<Self>, file: Option<PathBuf>) -> ReloadOutcome {
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || reload(&me.gw, &me.history, file.as_deref()))
            .await
            .unwrap_or_else(|e| ReloadOutcome::Refused(vec![format!("the reload failed: {e}")]))
    }
}

/// Reads `file` (else the file the gateway runs from) and puts it in force if it is
/// valid and can be applied in place. Blocking: files are read and certificates parsed.
fn reload(gw: &Gateway, history: &History, file: Option<&Path>) -> ReloadOutcome {
    let _one = history.running.lock();
    let outcome = apply(gw, history, file);
    gw.metrics
        .config_reloads
        .with_label_values(&[outcome.result()])
        .inc();
    match &outcome {
        ReloadOutcome::Applied { generation } => log::info!(
            "configuration reloaded: generation {generation} ({}) in force",
            gw.peek().hash
        ),
        ReloadOutcome::Refused(lines) => log::error!(
            "configuration reload refused, the running configuration stays: {}",
            lines.join("; ")
        ),
        ReloadOutcome::NeedsUpgrade(lines) => log::warn!(
            "configuration not reloaded in place, it needs a graceful upgrade (`fanout reload` performs it): {}",
            lines.join("; ")
        ),
    }
    *history.last.lock() = Some(Last {
        at: SystemTime::now(),
        outcome: outcome.clone(),
    });
    outcome
}

fn apply(gw: &Gateway, history: &History, file: Option<&Path>) -> ReloadOutcome {
    let Some(path) = file.map(Path::to_path_buf).or_else(|| history.file()) else {
        return ReloadOutcome::Refused(vec![
            "no configuration file to reload: this gateway runs from its command line".into(),
        ]);
    };
    let source = path.display().to_string();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => return ReloadOutcome::Refused(vec![format!("{source}: cannot read file: {e}")]),
    };
    let config = match config::from_yaml(&text, &source) {
        Ok(c) => c,
        Err(errors) => {
            return ReloadOutcome::Refused(errors.to_string().lines().map(String::from).collect())
        }
    };
    let current = gw.current();
    let mut upgrade = config::diff::needs_upgrade(&current.config, &config, gw.cache().is_some());
    upgrade.extend(history.binary_replaced());
    if !upgrade.is_empty() {
        return ReloadOutcome::NeedsUpgrade(upgrade);
    }
    // Every certificate is read again, and every listener's TLS settings built, before
    // anything changes: a bad one refuses the whole file.
    let mut tls = Vec::new();
    for l in &config.listen {
        if let Some(t) = &l.tls {
            match crate::tls::server_config(&t.certificates, t.min_tls13, l.http2) {
                Ok(c) => tls.push((l.addr, c)),
                Err(e) => {
                    return ReloadOutcome::Refused(vec![format!(
                        "{source}: listen {}: {e}",
                        l.addr
                    )])
                }
            }
        }
    }
    let number = current.number + 1;
    let config = Arc::new(config);
    let next = match Generation::new(
        Arc::clone(&config),
        text.into(),
        number,
        &gw.metrics,
        &gw.connector,
        Some(&current),
    ) {
        Ok(g) => g,
        Err(e) => return ReloadOutcome::Refused(vec![format!("{source}: {e}")]),
    };
    drop(current);
    for (addr, terminator) in gw.terminators.lock().iter() {
        if let Some((_, c)) = tls.iter().find(|(a, _)| a == addr) {
            terminator.replace(Arc::clone(c));
        }
    }
    gw.install(next);
    *history.file.lock() = Some(std::path::absolute(&path).unwrap_or(path));
    ReloadOutcome::Applied { generation: number }
}

/// A SIGHUP came before [`Hangup`] ran (see [`catch_hangup_until_handled`]).
static EARLY_HANGUP: AtomicBool = AtomicBool::new(false);

extern "C" fn note_hangup(_: libc::c_int) {
    EARLY_HANGUP.store(true, Relaxed);
}

/// The service that turns SIGHUP into a reload. A SIGHUP that came between the start of
/// `main` and this service is noted, not fatal, and applied as soon as the service runs.
pub struct Hangup {
    reloader: Arc<Reloader>,
}

impl Hangup {
    pub fn new(reloader: Arc<Reloader>) -> Hangup {
        Hangup { reloader }
    }
}

#[async_trait]
impl BackgroundService for Hangup {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            log::warn!("cannot watch SIGHUP: reload through `fanout reload` or POST /reload");
            return;
        };
        if EARLY_HANGUP.swap(false, Relaxed) {
            log::info!("SIGHUP (received while starting): reloading the configuration");
            self.reloader.reload(None).await;
        }
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    log::info!("SIGHUP: reloading the configuration");
                    self.reloader.reload(None).await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Notes SIGHUP until [`Hangup`] handles it (its default action would end the process).
pub fn catch_hangup_until_handled() {
    let handler: extern "C" fn(libc::c_int) = note_hangup;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGHUP, handler as libc::sighandler_t);
    }
}
