//! The command line. Every way to run the gateway — a file (`-c`), quick mode (`--backends`
//! or `--broadcast`, from flags or `FANOUT_*` variables) or the demo — ends in the same validated [`Config`]: quick
//! mode and the demo write configuration text and pass it through the same validation as
//! a file, so they can never accept what a file would refuse.

use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser};
use serde_json::json;

use crate::config::{self, Config, ConfigErrors};

#[derive(Parser, Debug)]
#[command(
    name = "fanout",
    version,
    about = "HTTP gateway on Pingora: load balancing, traffic mirroring and fan-out"
)]
pub struct Cli {
    /// Configuration file (YAML).
    #[arg(
        short = 'c',
        long = "conf",
        value_name = "FILE",
        env = "FANOUT_CONF",
        global = true
    )]
    pub conf: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Check the configuration and exit.
    #[arg(short = 't', long = "test")]
    pub test: bool,
    /// Run in the background (Pingora's daemon mode; writes server.pid_file).
    #[arg(short = 'd', long = "daemon")]
    pub daemon: bool,
    /// Take the listening sockets over from a running fanout (graceful upgrade).
    #[arg(short = 'u', long = "upgrade")]
    pub upgrade: bool,
    /// Run the built-in demonstration: demo backends, a gateway, and curl commands to try.
    #[arg(long)]
    pub demo: bool,
    #[command(flatten)]
    pub quick: QuickArgs,
    /// Admin listener address (/health, /ready, /metrics, /status), for quick mode and the demo.
    #[arg(long, value_name = "ADDR", env = "FANOUT_ADMIN")]
    pub admin: Option<String>,
    /// Ask a running fanout's admin listener for /health (default 127.0.0.1:9091) and exit 0
    /// when it answers 2xx, 1 otherwise: the container image's HEALTHCHECK.
    #[arg(long = "health-check", value_name = "ADDR", num_args = 0..=1,
          default_missing_value = crate::app::probe::DEFAULT_ADDRESS)]
    pub health_check: Option<String>,
    /// Where `-c` and the quick-mode flags came from (command line or environment).
    #[arg(skip)]
    sources: Sources,
}

/// Quick mode: one route, no file. Every flag can also come from its `FANOUT_*` variable.
#[derive(Args, Debug, Default)]
#[command(next_help_heading = "Quick mode (no file)")]
pub struct QuickArgs {
    /// Address to listen on: IP:PORT, or :PORT for every address [default: :8080];
    /// with --demo, the gateway's address.
    #[arg(long, value_name = "ADDR", env = "FANOUT_LISTEN")]
    pub listen: Option<String>,
    /// Backends of the route (the primary with --fallback), comma separated.
    #[arg(
        long,
        value_name = "URL,...",
        value_delimiter = ',',
        env = "FANOUT_BACKENDS"
    )]
    pub backends: Vec<String>,
    /// A broadcast route instead: answer 202 at once and deliver every request to each of
    /// these targets (a target URL's path, if any, is where its deliveries go).
    #[arg(
        long,
        value_name = "URL,...",
        value_delimiter = ',',
        env = "FANOUT_BROADCAST"
    )]
    pub broadcast: Vec<String>,
    /// Send every request to these as well, at once; the client gets the primary's answer
    /// (--backends), else the first success among these, else 502.
    #[arg(
        long,
        value_name = "URL,...",
        value_delimiter = ',',
        env = "FANOUT_FALLBACK"
    )]
    pub fallback: Vec<String>,
    /// The route's path prefix [default: /].
    #[arg(long, value_name = "PREFIX", env = "FANOUT_PATH")]
    pub path: Option<String>,
    /// round_robin (default), weighted, least_conn or consistent_hash.
    #[arg(long, value_name = "NAME", env = "FANOUT_BALANCE")]
    pub balance: Option<String>,
    /// Mirror every request to this backend.
    #[arg(long, value_name = "URL", env = "FANOUT_MIRROR")]
    pub mirror: Option<String>,
    /// Requests per second allowed per client IP (burst: the same number).
    #[arg(long = "rate-limit", value_name = "N", env = "FANOUT_RATE_LIMIT")]
    pub rate_limit: Option<f64>,
    /// How long a client may take to send its request head, and to send each piece of its
    /// body (clients.header_timeout, clients.body_timeout): else 408.
    #[arg(long = "read-timeout", value_name = "DURATION", env = "FANOUT_READ_TIMEOUT",
          value_parser = duration_arg)]
    pub read_timeout: Option<String>,
    /// How long a backend may take to take the request and to answer it (the upstreams'
    /// timeouts.write and timeouts.read): else 504.
    #[arg(long = "write-timeout", value_name = "DURATION", env = "FANOUT_WRITE_TIMEOUT",
          value_parser = duration_arg)]
    pub write_timeout: Option<String>,
    /// How long connecting to a backend may take (the upstreams' timeouts.connect).
    #[arg(long = "connect-timeout", value_name = "DURATION", env = "FANOUT_CONNECT_TIMEOUT",
          value_parser = duration_arg)]
    pub connect_timeout: Option<String>,
    /// Largest request body (10MB, 10MiB, 1048576): larger ones get 413.
    #[arg(long = "max-body-size", value_name = "SIZE", env = "FANOUT_MAX_BODY_SIZE",
          value_parser = size_arg)]
    pub max_body_size: Option<String>,
    /// Headers never sent to mirrors, fallbacks and broadcast targets [default:
    /// Authorization,X-API-Key,Cookie,Proxy-Authorization].
    #[arg(
        long = "redact-headers",
        value_name = "NAME,...",
        value_delimiter = ',',
        env = "FANOUT_REDACT_HEADERS"
    )]
    pub redact_headers: Vec<String>,
    /// The admin listener's bearer token is read from this file (with --admin): every
    /// admin request but /health and /ready must carry it.
    #[arg(
        long = "admin-token-file",
        value_name = "FILE",
        env = "FANOUT_ADMIN_TOKEN_FILE"
    )]
    pub admin_token_file: Option<String>,
    /// Keep accepted broadcasts in this directory until every target has them (a restart
    /// or crash loses none); without it they are kept in memory only.
    #[arg(long, value_name = "DIR", env = "FANOUT_SPOOL")]
    pub spool: Option<String>,
}

fn duration_arg(text: &str) -> Result<String, String> {
    config::units::parse_duration(text).map(|_| text.to_string())
}

fn size_arg(text: &str) -> Result<String, String> {
    config::units::parse_size(text).map(|_| text.to_string())
}

/// Where the settings that choose a mode came from: the command line beats the
/// environment, so `FANOUT_CONF` (the container image's default file) gives way to quick
/// mode asked for by `FANOUT_BROADCAST` or `FANOUT_BACKENDS`, and `-c FILE` to nothing.
#[derive(Debug, Default, Clone, Copy)]
struct Sources {
    conf: Option<ValueSource>,
    /// `--backends` or `--broadcast`, the flags that ask for quick mode.
    quick: Option<ValueSource>,
    /// Quick-mode flags given on the command line, the ones that ask for it or not.
    quick_flags_on_command_line: bool,
}

/// Quick-mode flags other than `--listen` (which the demo takes too).
const QUICK_ONLY: [&str; 14] = [
    "backends",
    "broadcast",
    "fallback",
    "path",
    "balance",
    "mirror",
    "rate_limit",
    "read_timeout",
    "write_timeout",
    "connect_timeout",
    "max_body_size",
    "redact_headers",
    "admin_token_file",
    "spool",
];

impl Sources {
    fn of(m: &ArgMatches) -> Sources {
        let source = |id: &str| {
            m.value_source(id)
                .filter(|s| *s != ValueSource::DefaultValue)
        };
        Sources {
            conf: source("conf"),
            quick: source("backends").max(source("broadcast")),
            quick_flags_on_command_line: QUICK_ONLY
                .iter()
                .any(|id| source(id) == Some(ValueSource::CommandLine)),
        }
    }
}

/// Commands to a running gateway.
#[derive(clap::Subcommand, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Apply the configuration file (-c) to the running gateway: in place when it can be,
    /// else by graceful upgrade; exit 0 once it serves the file, non-zero with the reason.
    Reload,
}

/// What the command line asks to run.
pub enum Mode {
    File(PathBuf),
    Quick,
    Demo,
}

impl Cli {
    /// The command line and the environment, with where each setting came from.
    pub fn from_env_and_args() -> Cli {
        let matches = Cli::command().get_matches();
        let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        cli.sources = Sources::of(&matches);
        cli
    }

    pub fn mode(&self) -> Result<Mode, String> {
        use ValueSource::CommandLine;
        let q = &self.quick;
        let s = self.sources;
        if self.demo {
            if s.conf == Some(CommandLine) || s.quick == Some(CommandLine) {
                return Err("choose one of -c FILE, --demo, and quick mode".into());
            }
            return Ok(Mode::Demo);
        }
        let quick = match s.conf {
            Some(CommandLine) if s.quick_flags_on_command_line => {
                return Err(
                    "choose one of -c FILE, --demo, and quick mode (--backends or --broadcast)"
                        .into(),
                )
            }
            // A file named on the command line beats quick-mode settings from the environment.
            Some(CommandLine) => false,
            _ => s.quick.is_some(),
        };
        if !quick {
            return match &self.conf {
                Some(path) if !s.quick_flags_on_command_line => Ok(Mode::File(path.clone())),
                Some(_) => Err("quick-mode flags need --backends or --broadcast".into()),
                None if s.quick_flags_on_command_line || q.listen.is_some() => Err(
                    "quick mode needs --backends URL[,URL...] or --broadcast URL[,URL...]".into(),
                ),
                None => Err(
                    "nothing to run: give -c FILE, --demo, or --backends URL[,URL...] \
                     (or --broadcast URL[,URL...])"
                        .into(),
                ),
            };
        }
        match (q.backends.is_empty(), q.broadcast.is_empty()) {
            (false, false) => {
                Err("choose one of --backends (a proxy route) and --broadcast".into())
            }
            (true, false) if !q.fallback.is_empty() => {
                Err("--fallback needs --backends as the primary".into())
            }
            (true, false) if q.mirror.is_some() => {
                Err("--mirror applies to a proxy route (--backends)".into())
            }
            _ => Ok(Mode::Quick),
        }
    }

    /// The configuration text quick mode stands for.
    pub fn quick_config_yaml(&self) -> Result<String, String> {
        let q = &self.quick;
        let timeouts = {
            let mut t = serde_json::Map::new();
            if let Some(d) = &q.connect_timeout {
                t.insert("connect".into(), json!(d));
            }
            if let Some(d) = &q.write_timeout {
                t.insert("read".into(), json!(d));
                t.insert("write".into(), json!(d));
            }
            t
        };
        let with_backends = |backends: Vec<String>| {
            let mut u = json!({ "backends": backends });
            if !timeouts.is_empty() {
                u["timeouts"] = json!(timeouts);
            }
            u
        };
        let upstream = |urls: &[String], flag: &str| -> Result<serde_json::Value, String> {
            let backends = urls
                .iter()
                .map(|u| match backend_url(u)? {
                    (backend, None) => Ok(backend),
                    (_, Some(path)) => Err(format!(
                        "--{flag}: {u}: a backend URL takes no path ({path}); the request's path is kept"
                    )),
                })
                .collect::<Result<Vec<_>, String>>()?;
            Ok(with_backends(backends))
        };
        let mut upstreams = serde_json::Map::new();
        let mut route = json!({ "match": { "prefix": q.path.as_deref().unwrap_or("/") } });
        if q.broadcast.is_empty() {
            let mut primary = upstream(&q.backends, "backends")?;
            if let Some(balance) = &q.balance {
                primary["balance"] = json!(balance);
            }
            upstreams.insert("backends".into(), primary);
            route["upstream"] = json!("backends");
            let mut fallback = Vec::new();
            for (i, url) in q.fallback.iter().enumerate() {
                let name = format!("fallback{}", i + 1);
                upstreams.insert(
                    name.clone(),
                    upstream(std::slice::from_ref(url), "fallback")?,
                );
                fallback.push(name);
            }
            if !fallback.is_empty() {
                route["fallback"] = json!(fallback);
            }
        } else {
            let mut targets = Vec::new();
            for (i, url) in q.broadcast.iter().enumerate() {
                let name = format!("target{}", i + 1);
                let (backend, path) = backend_url(url)?;
                // Webhook receivers on other hosts want their own name as Host.
                let mut target = with_backends(vec![backend]);
                target["host_header"] = json!("backend");
                upstreams.insert(name.clone(), target);
                targets.push(match path {
                    Some(path) => json!({ "upstream": name, "path": path }),
                    None => json!(name),
                });
            }
            route["broadcast"] = json!(targets);
        }
        if let Some(mirror) = &q.mirror {
            upstreams.insert(
                "mirror".into(),
                upstream(std::slice::from_ref(mirror), "mirror")?,
            );
            let mut m = json!({ "upstream": "mirror" });
            if !q.redact_headers.is_empty() {
                m["redact_headers"] = json!(q.redact_headers);
            }
            route["mirror"] = json!([m]);
        }
        if !q.redact_headers.is_empty() {
            route["redact_headers"] = json!(q.redact_headers);
        }
        if let Some(rps) = q.rate_limit {
            route["rate_limit"] = json!({ "requests_per_second": rps });
        }
        let mut doc = json!({
            "listen": [q.listen.as_deref().unwrap_or(DEFAULT_QUICK_LISTEN)],
            "upstreams": upstreams,
            "routes": [route],
        });
        match (&self.admin, &q.admin_token_file) {
            (Some(admin), None) => doc["admin"] = json!(admin),
            (Some(admin), Some(file)) => {
                doc["admin"] = json!({ "address": admin, "token_file": file })
            }
            (None, Some(_)) => return Err("--admin-token-file needs --admin ADDR".into()),
            (None, None) => {}
        }
        if let Some(dir) = &q.spool {
            doc["spool"] = json!({ "dir": dir });
        }
        if let Some(d) = &q.read_timeout {
            doc["clients"] = json!({ "header_timeout": d, "body_timeout": d });
        }
        if let Some(size) = &q.max_body_size {
            doc["defaults"] = json!({ "max_body_bytes": size });
        }
        serde_yaml::to_string(&doc).map_err(|e| e.to_string())
    }
}

/// Where quick mode listens when no `--listen` is given: every address, port 8080 (the
/// container image's port, and FanOut's).
pub const DEFAULT_QUICK_LISTEN: &str = ":8080";

/// A quick-mode URL as a backend (`http://HOST:PORT` or `https://HOST:PORT`, the port
/// filled in from the scheme) and the path it names, if it names one besides `/`.
fn backend_url(url: &str) -> Result<(String, Option<String>), String> {
    let bad = |why: &str| format!("{url}: {why}");
    let uri: http::Uri = url.trim().parse().map_err(|e| bad(&format!("{e}")))?;
    let scheme = match uri.scheme_str() {
        Some("http") | None => "http",
        Some("https") => "https",
        Some(other) => return Err(bad(&format!("scheme {other:?} is not http or https"))),
    };
    let authority = uri.authority().ok_or_else(|| bad("no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("user information in a backend URL is not supported"));
    }
    let port = authority
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    let backend = format!("{scheme}://{}:{port}", authority.host());
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| !p.is_empty() && *p != "/")
        .map(str::to_string);
    Ok((backend, path))
}

/// Loads the configuration of a file or quick mode, with the text it was read from.
pub fn load(cli: &Cli, mode: &Mode) -> Result<(Config, String), ConfigErrors> {
    let (text, source) = match mode {
        Mode::File(path) => (config::read(path)?, path.display().to_string()),
        Mode::Quick => match cli.quick_config_yaml() {
            Ok(yaml) => (yaml, "command line".to_string()),
            Err(e) => {
                return Err(ConfigErrors {
                    source: "command line".into(),
                    errors: vec![config::ConfigError::new("", e)],
                })
            }
        },
        Mode::Demo => (
            crate::app::demo::config_yaml(cli.quick.listen.as_deref(), cli.admin.as_deref()),
            "demo".to_string(),
        ),
    };
    let config = config::from_yaml(&text, &source)?;
    // Each route's `plugins:`, checked by the filters' own constructors.
    let problems = crate::filters::plugins::check(&config);
    if !problems.is_empty() {
        return Err(config::located(&text, &source, problems));
    }
    Ok((config, text))
}
