//! The command line of SPEC.md. Every way to run the gateway — a file (`-c`), quick mode
//! (`--listen` + `--backends`) or the demo — ends in the same validated [`Config`]: quick
//! mode and the demo write configuration text and pass it through the same validation as
//! a file, so they can never accept what a file would refuse.

use std::path::PathBuf;

use clap::Parser;
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
    #[arg(short = 'c', long = "conf", value_name = "FILE")]
    pub conf: Option<PathBuf>,
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
    /// Quick mode: the address to listen on (with --backends); with --demo, the gateway's address.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Quick mode: backends of the single `/` route, comma separated.
    #[arg(long, value_name = "URL,...", value_delimiter = ',')]
    pub backends: Vec<String>,
    /// Quick mode: round_robin (default), weighted, least_conn or consistent_hash.
    #[arg(long, value_name = "NAME")]
    pub balance: Option<String>,
    /// Quick mode: mirror every request to this backend.
    #[arg(long, value_name = "URL")]
    pub mirror: Option<String>,
    /// Quick mode: requests per second allowed per client IP.
    #[arg(long = "rate-limit", value_name = "N")]
    pub rate_limit: Option<f64>,
    /// Admin listener address (/health, /ready, /metrics, /status), for quick mode and the demo.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,
    /// Ask a running fanout's admin listener for /health (default 127.0.0.1:9091) and exit 0
    /// when it answers 2xx, 1 otherwise: the container image's HEALTHCHECK.
    #[arg(long = "health-check", value_name = "ADDR", num_args = 0..=1,
          default_missing_value = crate::probe::DEFAULT_ADDRESS)]
    pub health_check: Option<String>,
}

/// What the command line asks to run.
pub enum Mode {
    File(PathBuf),
    Quick,
    Demo,
}

impl Cli {
    pub fn mode(&self) -> Result<Mode, String> {
        let quick = self.listen.is_some() || !self.backends.is_empty();
        match (&self.conf, self.demo, quick) {
            (Some(path), false, false) => Ok(Mode::File(path.clone())),
            (None, true, _) if self.backends.is_empty() => Ok(Mode::Demo),
            (None, false, true) if self.listen.is_some() && !self.backends.is_empty() => {
                Ok(Mode::Quick)
            }
            (None, false, true) => {
                Err("quick mode needs both --listen ADDR and --backends URL[,URL...]".into())
            }
            (None, false, false) => Err(
                "nothing to run: give -c FILE, --demo, or --listen ADDR --backends URL[,URL...]"
                    .into(),
            ),
            _ => Err("choose one of -c FILE, --demo, and --listen/--backends".into()),
        }
    }

    /// The configuration text quick mode stands for.
    pub fn quick_config_yaml(&self) -> String {
        let mut upstreams = json!({ "backends": { "backends": self.backends } });
        if let Some(balance) = &self.balance {
            upstreams["backends"]["balance"] = json!(balance);
        }
        let mut route = json!({ "match": { "prefix": "/" }, "upstream": "backends" });
        if let Some(mirror) = &self.mirror {
            upstreams["mirror"] = json!({ "backends": [mirror] });
            route["mirror"] = json!([{ "upstream": "mirror" }]);
        }
        if let Some(rps) = self.rate_limit {
            route["rate_limit"] = json!({ "requests_per_second": rps });
        }
        let mut doc = json!({
            "listen": [self.listen],
            "upstreams": upstreams,
            "routes": [route],
        });
        if let Some(admin) = &self.admin {
            doc["admin"] = json!(admin);
        }
        serde_yaml::to_string(&doc).unwrap_or_default()
    }
}

/// Loads the configuration of a file or quick mode.
pub fn load(cli: &Cli, mode: &Mode) -> Result<Config, ConfigErrors> {
    match mode {
        Mode::File(path) => config::load(path),
        Mode::Quick => config::from_yaml(&cli.quick_config_yaml(), "command line"),
        Mode::Demo => config::from_yaml(
            &crate::demo::config_yaml(cli.listen.as_deref(), cli.admin.as_deref()),
            "demo",
        ),
    }
}
