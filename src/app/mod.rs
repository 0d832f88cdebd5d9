//! The process: the command line ([`cli`]), building and running the Pingora server with
//! every service ([`server`]), the built-in demonstration ([`demo`]), the signals that
//! mark the gateway draining ([`lifecycle`]) and `--health-check` ([`probe`]). `main.rs`
//! only calls [`main`].

pub mod cli;
pub mod demo;
pub mod lifecycle;
pub mod probe;
pub mod server;

use cli::{Cli, Mode};

/// What is logged without `RUST_LOG`: fanout's own lines from `info` up, Pingora's from
/// `warn` up (its start-up narrates a dozen `info` lines; `RUST_LOG=info` shows them).
const DEFAULT_LOG: &str = "info,pingora=warn,pingora_core=warn,pingora_proxy=warn";

/// The `fanout` command: sets up logging, reads the command line and the configuration,
/// and runs the gateway (or `-t`, `reload`, `--health-check`); returns the exit status.
/// A program that registers its own filters ([`crate::filters::plugins::register`]) calls
/// this from its `main` after registering them.
pub fn main() -> i32 {
    // SIGHUP reloads the configuration; one that comes before the server runs is kept for
    // then, rather than ending the process as its default action would.
    crate::reload::catch_hangup_until_handled();
    // An empty RUST_LOG (a unit's `Environment=RUST_LOG=`) means the default too.
    let filters = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_LOG.to_string());
    let mut logger = env_logger::Builder::new();
    logger.parse_filters(&filters);
    if let Ok(style) = std::env::var("RUST_LOG_STYLE") {
        logger.parse_write_style(&style);
    }
    logger.init();
    run(Cli::from_env_and_args())
}

fn run(cli: Cli) -> i32 {
    if let Some(address) = &cli.health_check {
        return match crate::app::probe::health(address) {
            Ok(line) => {
                println!("{line}");
                0
            }
            Err(e) => {
                eprintln!("fanout: health check: {e}");
                1
            }
        };
    }
    if cli.command == Some(cli::Command::Reload) {
        return crate::reload::command::run(cli.conf.as_deref());
    }
    let mode = match cli.mode() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("fanout: {e}");
            return 2;
        }
    };
    let (config, text) = match cli::load(&cli, &mode) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return 1;
        }
    };
    for w in &config.warnings {
        eprintln!("fanout: warning: {}: {}", w.path, w.message);
    }
    if cli.test {
        println!("configuration OK");
        return 0;
    }
    let demo_mode = matches!(mode, Mode::Demo);
    let extra = if demo_mode {
        demo::backend_services()
    } else {
        Vec::new()
    };
    let process = server::ProcessOptions {
        daemon: cli.daemon,
        upgrade: cli.upgrade,
    };
    let file = match &mode {
        Mode::File(path) => Some(path.clone()),
        Mode::Quick | Mode::Demo => None,
    };
    let announcement = if demo_mode {
        server::Announcement::Print(demo::banner(
            cli.quick.listen.as_deref(),
            cli.admin.as_deref(),
        ))
    } else {
        server::Announcement::Log(server::serving_line(&config))
    };
    let source = server::ConfigSource { text, file };
    let (server, _gateway) = match server::build(config, source, process, extra, Some(announcement))
    {
        Ok(built) => built,
        Err(e) => {
            eprintln!("fanout: {e}");
            return 1;
        }
    };
    server.run_forever()
}
