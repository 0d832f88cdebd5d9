#!/usr/bin/env python3
"""`make systemd-test`: systemd/fanout.service run by a real systemd, as PID 1 of a Debian
container (the base made offline by debootstrap from Debian's packages and imported once,
then reused). The install lines of README.md's "Install as a systemd service" run in it as
written (`sudo` as a no-op, `make build` done on the host); the example configuration is
then replaced by one whose backend is nginx in the same container (a second systemd
service). The first answer is fetched from the host through the published port; the load is
wrk inside the container, so the figures are not those of slirp4netns' forwarding. Under it:

  1. `systemctl reload` after installing a new binary: a graceful upgrade, the new process
     runs the new file, MAINPID follows it;
  2. `systemctl reload` after changing the configuration: in place (the same MAINPID),
     answers carry the new header; and `kill -HUP` does the same;
  3. `systemctl reload` with a broken configuration: refused, the old process keeps
     serving with the same MAINPID;
  4. no request failed (wrk's socket errors and non-2xx answers) through all three;
  5. `systemctl stop` ends within TimeoutStopSec; the journal holds access-log and
     error-log lines.

Every wait is bounded; the container is removed whatever happens. Ends
with "N passed, N failed".
"""
import http.client
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE = os.environ.get("ENGINE", "podman")
BASE = "fanout-systemd-base:bookworm-2"
NAME = f"fanout-systemd-test-{os.getpid()}"
results = []
figures = []


def check(name, ok, detail=""):
    results.append(ok)
    print(f"{'ok' if ok else 'FAIL'} - {name}{': ' + detail if detail else ''}", flush=True)


def run(cmd, timeout=120, check_rc=True, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check_rc and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.returncode}: {out.stderr.strip()[-1000:]}")
    return out


def engine(*args, **kw):
    return run([ENGINE, *args], **kw)


def inside(script, **kw):
    """Runs a bash script in the container (as root, beside systemd)."""
    return engine("exec", NAME, "bash", "-c", script, **kw)


def apt_install(*packages):
    missing = [p for p in packages
               if shutil.which(p) is None and not os.path.exists(f"/usr/sbin/{p}")]
    if missing:
        print(f"installing {' '.join(missing)}", flush=True)
        run(["apt-get", "update", "-qq"], timeout=300)
        run(["apt-get", "install", "-y", "-qq", *missing], timeout=600,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def debian_mirror():
    """The Debian mirror this host's apt uses (deb822 or one-line sources)."""
    for path in ["/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"]:
        if os.path.exists(path):
            text = open(path).read()
            m = re.search(r"^URIs:\s*(\S+)", text, re.M) or re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M)
            if m:
                return m.group(1)
    raise RuntimeError("no Debian mirror found in the host's apt sources")


def ensure_base():
    if engine("image", "exists", BASE, check_rc=False).returncode == 0:
        return
    apt_install("debootstrap")
    target = os.path.join(ROOT, "target", "systemd-base")
    shutil.rmtree(target, ignore_errors=True)
    started = time.time()
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    run([debootstrap, "--variant=minbase", "--include=systemd,systemd-sysv,procps,nginx-light,wrk",
         "bookworm", target, debian_mirror()], timeout=900)
    tar = subprocess.Popen(["tar", "-C", target, "-c", "."], stdout=subprocess.PIPE)
    run([ENGINE, "import", "-q", "-", BASE], stdin=tar.stdout, timeout=300)
    tar.wait()
    shutil.rmtree(target, ignore_errors=True)
    figures.append(f"base image made in {time.time() - started:.0f} s")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port, path="/", timeout=5):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def eventually(what, cond, limit=30.0):
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            if cond():
                return True
        except (OSError, RuntimeError, http.client.HTTPException):
            pass
        time.sleep(0.1)
    print(f"  gave up waiting: {what}", flush=True)
    return False


BACKEND = "127.0.0.1:8081"
NGINX_SITE = """server {
    listen 127.0.0.1:8081;
    access_log off;
    location / { return 200 "ok"; }
}
"""


def config(header=None):
    route_headers = f"\n    response_headers: {{ set: {{ X-Config: {header} }} }}" if header else ""
    return f"""server:
  pid_file: /run/fanout/fanout.pid
  upgrade_sock: /run/fanout/upgrade.sock
  grace_period_seconds: 2
  graceful_shutdown_timeout_seconds: 1
listen: ["0.0.0.0:8080"]
admin: 127.0.0.1:9091
defaults: {{ access_log: json }}
upstreams:
  host: {{ backends: [{BACKEND}] }}
routes:
  - match: {{ prefix: / }}
    upstream: host{route_headers}
"""


def readme_install_lines():
    """The commands of README.md's systemd install block, `make build` left to the host."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = text.split("## Install as a systemd service", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    lines = [l.split("#", 1)[0].strip() for l in block.strip().splitlines()]
    return [l for l in lines if l and l != "make build" and "systemctl reload" not in l]


def write_conf(text):
    inside(f"cat > /etc/fanout/fanout.yaml <<'YAML'\n{text}YAML")


def main_pid():
    return inside("systemctl show -p MainPID --value fanout").stdout.strip()


def exe_of(pid):
    return inside(f"readlink /proc/{pid}/exe").stdout.strip()


def gone(pid):
    return inside(f"test -d /proc/{pid}", check_rc=False).returncode != 0


def main():
    ensure_base()
    gw = free_port()
    wrk = None
    try:
        engine("run", "-d", "--name", NAME, "--systemd=always",
               # to read /proc/PID/exe of the service's processes (another uid)
               "--cap-add=SYS_PTRACE",
               "--network", "slirp4netns:allow_host_loopback=true",
               "-p", f"127.0.0.1:{gw}:8080", "-v", f"{ROOT}:/src:ro", BASE, "/sbin/init")
        check("systemd runs as PID 1", eventually(
            "systemd up", lambda: inside("systemctl is-system-running --wait", check_rc=False,
                                         timeout=60).stdout.strip() in ("running", "degraded")))
        # README's lines, with the edit of the example configuration done by the test.
        inside(f"cat > /etc/nginx/sites-enabled/default <<'EOF'\n{NGINX_SITE}EOF\nsystemctl reload-or-restart nginx")
        script = ["set -ex", "cd /src", "sudo() { \"$@\"; }"]
        for line in readme_install_lines():
            script.append(line)
            if "conf/fanout.yaml /etc/fanout/fanout.yaml" in line:
                script.append(f"cat > /etc/fanout/fanout.yaml <<'YAML'\n{config()}YAML")
        started = time.time()
        out = inside("\n".join(script), check_rc=False, timeout=120)
        check("README's install lines start the service", out.returncode == 0,
              out.stderr.strip()[-600:] if out.returncode else "")
        ready = eventually("answers through the published port", lambda: get(gw)[0] == 200)
        check("fanout answers through the published port", ready,
              f"{time.time() - started:.2f} s from install to the first answer")
        if not ready:
            return

        wrk_out = tempfile.TemporaryFile(mode="w+")
        wrk = subprocess.Popen([ENGINE, "exec", NAME, "wrk", "-t1", "-c16", "-d300s",
                                "http://127.0.0.1:8080/load"], stdout=wrk_out, stderr=subprocess.STDOUT)
        time.sleep(1)

        # 1. A new binary (the same build, installed again: a new file the old process
        #    does not run).
        old = main_pid()
        inside("install -m 0755 /src/target/release/fanout /usr/local/bin/fanout")
        replaced = exe_of(old)
        t0 = time.time()
        r = inside("systemctl reload fanout", check_rc=False, timeout=60)
        took = time.time() - t0
        new = main_pid()
        check("reload with a new binary: MAINPID moves to the new process",
              r.returncode == 0 and new != old and replaced.endswith("(deleted)")
              and exe_of(new) == "/usr/local/bin/fanout",
              f"{old} ({replaced}) -> {new} ({exe_of(new)}), reload took {took:.2f} s")
        check("the old process exits", eventually(f"pid {old} gone", lambda: gone(old), 30))

        # 2. A changed configuration: applied in place, by systemctl and by SIGHUP.
        write_conf(config(header="two"))
        old = new
        t0 = time.time()
        r = inside("systemctl reload fanout", check_rc=False, timeout=60)
        took = time.time() - t0
        new = main_pid()
        check("reload with a changed configuration: in place, answers carry its header",
              r.returncode == 0 and new == old and get(gw)[1].get("x-config") == "two",
              f"MAINPID {old} -> {new}, systemctl reload took {took:.2f} s: {r.stdout.strip()[-200:]}")
        figures.append(f"systemctl reload in place: {took:.2f} s")
        write_conf(config(header="hup"))
        inside(f"kill -HUP {new}")
        check("kill -HUP reloads in place",
              eventually("X-Config: hup", lambda: get(gw)[1].get("x-config") == "hup", 10)
              and main_pid() == new)
        write_conf(config(header="two"))
        inside(f"kill -HUP {new}")
        eventually("X-Config: two", lambda: get(gw)[1].get("x-config") == "two", 10)

        # 3. A broken configuration: refused, nothing changes.
        write_conf(config(header="three") + "    bogus_key: 1\n")
        r = inside("systemctl reload fanout", check_rc=False, timeout=60)
        same = main_pid()
        active = inside("systemctl is-active fanout", check_rc=False).stdout.strip()
        status, headers = get(gw)
        check("reload with a broken configuration is refused; the old process serves on",
              r.returncode != 0 and same == new and active == "active" and status == 200
              and headers.get("x-config") == "two",
              f"reload exit {r.returncode}, MAINPID {new} -> {same}, {active}, {status}")
        write_conf(config(header="two"))
        time.sleep(1)

        inside("pkill -INT -x wrk")
        wrk.wait(30)
        wrk_out.seek(0)
        report = wrk_out.read()
        total = re.search(r"(\d+) requests in", report)
        errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", report))
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", report)
        failed = errors + (int(non2xx.group(1)) if non2xx else 0)
        check("no request failed under wrk through the three reloads",
              total is not None and int(total.group(1)) > 0 and failed == 0,
              f"{total.group(1) if total else '?'} requests, {failed} failed")
        figures.append(f"wrk -c16 through three reloads: {total.group(1) if total else '?'} requests, {failed} failed")

        journal = inside("journalctl -u fanout --no-pager -o cat", check_rc=False).stdout
        wanted = {"error log": "SIGQUIT: draining", "the refused file's problem": "bogus_key"}
        missing = [what for what, text in wanted.items() if text not in journal]
        # Every request has its line: journald's rate limit would drop most of them.
        logged = journal.count('"path":"/load"')
        served = int(total.group(1)) if total else 0
        check("the journal holds every access-log line, the error log and -t's refusal",
              not missing and logged >= served > 0,
              f"{logged} access-log lines for {served} requests" + (f", missing: {missing}" if missing else ""))

        timeout_stop = inside("systemctl show -p TimeoutStopUSec --value fanout").stdout.strip()
        t0 = time.time()
        r = inside("systemctl stop fanout", check_rc=False, timeout=90)
        took = time.time() - t0
        state = inside("systemctl show -p ActiveState -p Result fanout", check_rc=False).stdout.split()
        check("systemctl stop ends within TimeoutStopSec, cleanly",
              r.returncode == 0 and took < 40 and "Result=success" in state,
              f"{took:.1f} s (TimeoutStopSec {timeout_stop}), {' '.join(state)}")
    finally:
        if wrk and wrk.poll() is None:
            wrk.kill()
        if os.environ.get("KEEP_CONTAINER"):
            print(f"  kept: {ENGINE} exec -it {NAME} bash")
        else:
            engine("rm", "-f", NAME, check_rc=False, timeout=60)
    for f in figures:
        print(f"  {f}")
    passed = sum(results)
    print(f"{passed} passed, {len(results) - passed} failed")


if __name__ == "__main__":
    main()
    sys.exit(0 if results and all(results) else 1)
