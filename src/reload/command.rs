//! `fanout reload [-c FILE]`: checks the file here first (a bad file changes nothing and
//! exits non-zero with one line per problem), then asks the running process, through its
//! [`super::control`] socket, to apply it in place. When the process answers that the
//! changes need a new process (listeners, `server:`, the admin address, the spool, the
//! resolver, the cache's size, a new binary on disk), this command performs Pingora's
//! graceful upgrade itself: it starts the process's own command line again with `-u` (and
//! this file), sends the running one SIGQUIT, and exits 0 once the new process answers.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::control::{ask, socket_path};
use crate::config;

/// How long the running process may take to reload.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a new process may take to take the sockets over and answer.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the command; the process's exit code.
pub fn run(conf: Option<&Path>) -> i32 {
    match reload(conf) {
        Ok(message) => {
            println!("{message}");
            0
        }
        Err(lines) => {
            for l in lines.lines() {
                eprintln!("fanout reload: {l}");
            }
            1
        }
    }
}

fn reload(conf: Option<&Path>) -> Result<String, String> {
    let conf = conf.ok_or("give the configuration file: -c FILE (or FANOUT_CONF)")?;
    let conf = std::path::absolute(conf).map_err(|e| format!("{}: {e}", conf.display()))?;
    let config = config::load(&conf).map_err(|e| e.to_string())?;
    let socket = socket_path(&config.server.upgrade_sock);
    let answer = ask(
        &socket,
        &json!({ "op": "reload", "file": conf }),
        RELOAD_TIMEOUT,
    )
    .map_err(|e| format!("{e} (is fanout running with this file's server.upgrade_sock?)"))?;
    let lines = |key: &str| -> Vec<String> {
        answer[key]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    match answer["result"].as_str() {
        Some("ok") => Ok(format!(
            "{}: in force in place as generation {} (process {})",
            conf.display(),
            answer["generation"],
            answer["pid"]
        )),
        Some("error") => Err(lines("errors").join("\n")),
        Some("upgrade") => {
            for l in lines("needs_upgrade") {
                println!("needs a graceful upgrade: {l}");
            }
            let addrs: Vec<SocketAddr> = config.listen.iter().map(|l| l.addr).collect();
            upgrade(&answer, &conf, &socket, &addrs)
        }
        _ => Err(format!("unexpected answer: {answer}")),
    }
}

/// The running process's command line made its successor's: `-c` names `conf`, `-u`
/// takes the sockets over.
fn successor_args(argv: &[String], conf: &Path) -> Vec<String> {
    let mut args = Vec::new();
    let mut skip = false;
    for a in argv {
        if std::mem::take(&mut skip) {
            continue;
        }
        match a.as_str() {
            "-u" | "--upgrade" => {}
            "-c" | "--conf" => skip = true,
            _ if a.starts_with("--conf=") => {}
            _ if a.starts_with("-c") && a.len() > 2 && !a.starts_with("--") => {}
            _ => args.push(a.clone()),
        }
    }
    args.push("-c".into());
    args.push(conf.display().to_string());
    args.push("-u".into());
    args
}

/// Whether something accepts connections on every one of `addrs` (an unspecified address
/// is tried on its family's loopback).
fn all_listening(addrs: &[SocketAddr]) -> bool {
    addrs.iter().all(|a| {
        let mut a = *a;
        if a.ip().is_unspecified() {
            a.set_ip(match a {
                SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
            });
        }
        TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok()
    })
}

fn upgrade(
    answer: &Value,
    conf: &Path,
    socket: &Path,
    listen: &[SocketAddr],
) -> Result<String, String> {
    let old = answer["pid"]
        .as_i64()
        .ok_or("the running process did not say its process id")? as i32;
    let argv: Vec<String> = answer["argv"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let exe = answer["exe"]
        .as_str()
        .filter(|e| !e.is_empty())
        .ok_or("the running process did not say its binary")?;
    let args = successor_args(argv.get(1..).unwrap_or(&[]), conf);
    let daemon = args.iter().any(|a| a == "-d" || a == "--daemon");
    let mut cmd = Command::new(exe);
    // The successor writes its logs and access log where the running process writes them
    // (Pingora's daemons keep their stdout and stderr): a file, pipe or terminal is opened
    // again through /proc; a socket (journald's stream under systemd) cannot be, and is
    // then this command's own, which systemd connects to the same journal.
    let output = |fd: u8| -> Stdio {
        std::fs::OpenOptions::new()
            .append(true)
            .open(format!("/proc/{old}/fd/{fd}"))
            .map_or(Stdio::inherit(), Stdio::from)
    };
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(output(1))
        .stderr(output(2));
    {
        use std::os::unix::process::CommandExt;
        // Its own process group: signals meant for this command do not reach it.
        cmd.process_group(0);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {exe}: {e}"))?;
    // The new process waits on server.upgrade_sock for the sockets; SIGQUIT makes the
    // running one send them, then finish its requests and exit.
    // SAFETY: kill(2) with a process id and a signal number has no memory preconditions.
    if unsafe { libc::kill(old, libc::SIGQUIT) } != 0 {
        let _ = child.kill();
        return Err(format!(
            "cannot signal process {old}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let deadline = Instant::now() + UPGRADE_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            // A daemon's first process exits once the daemon serves; anything else that
            // exits has failed.
            if !daemon || !status.success() {
                return Err(format!("the new process exited ({status}) before serving"));
            }
        }
        if let Ok(now) = ask(socket, &json!({ "op": "status" }), Duration::from_secs(2)) {
            let pid = now["pid"].as_i64().unwrap_or(0) as i32;
            // The new process answers, and serves every listener of the file.
            if pid != 0 && pid != old && all_listening(listen) {
                return Ok(format!(
                    "{}: in force by graceful upgrade as process {pid} (process {old} finishes its requests and exits)",
                    conf.display()
                ));
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the new process did not answer within {}s",
                UPGRADE_TIMEOUT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_successor_runs_the_same_command_with_the_new_file_and_upgrade() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let conf = Path::new("/etc/fanout/new.yaml");
        assert_eq!(
            successor_args(&s(&["-d", "-c", "/etc/fanout/old.yaml"]), conf),
            s(&["-d", "-c", "/etc/fanout/new.yaml", "-u"])
        );
        assert_eq!(
            successor_args(&s(&["--conf=/a", "-u", "-d"]), conf),
            s(&["-d", "-c", "/etc/fanout/new.yaml", "-u"])
        );
        assert_eq!(
            successor_args(&s(&["-c/a"]), conf),
            s(&["-c", "/etc/fanout/new.yaml", "-u"])
        );
    }
}
