#!/usr/bin/env python3
"""`make bench-reload`: what a configuration reload costs.

For a file of 10 and of 10,000 routes (every route a prefix on one of two upstreams):
  - in place: the time from the request to reload (`POST /reload`, which answers once the
    new generation is in force) to its answer, p50/p99 over 100 reloads alternating two
    files; and from a SIGHUP to `/status` showing the next generation (polled every
    millisecond), over 50; the process's CPU time and RSS growth over them;
  - RSS after 1,000 reloads against before (no growth beyond a few MiB is the bar);
  - the same change made by process swap (`fanout reload` with a listener change, i.e.
    `-u` + SIGQUIT): time until the new process answers on every listener, and the peak
    RSS of both processes while they run side by side.
A backend answers on loopback (Python's http.server is enough: no request goes to it
during the measurements but the checks). Prints a Markdown table.
"""
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FANOUT = os.path.join(ROOT, "target", "release", "fanout")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def conf(d, port, admin, routes, flip, listen_extra=None):
    listen = [f"127.0.0.1:{port}"] + ([f"127.0.0.1:{listen_extra}"] if listen_extra else [])
    lines = [
        "server:",
        "  threads: 2",
        "  grace_period_seconds: 1",
        "  graceful_shutdown_timeout_seconds: 1",
        f"  pid_file: {d}/fanout.pid",
        f"  upgrade_sock: {d}/upgrade.sock",
        f"listen: {json.dumps(listen)}",
        f"admin: 127.0.0.1:{admin}",
        "defaults: { access_log: off }",
        "upstreams:",
        "  a: { backends: [\"127.0.0.1:9\"] }",
        "  b: { backends: [\"127.0.0.1:9\"] }",
        "routes:",
    ]
    for i in range(routes):
        up = "ab"[(i + flip) % 2]
        lines.append(f"  - {{ match: {{ prefix: /r{i}/ }}, upstream: {up} }}")
    path = os.path.join(d, "fanout.yaml")
    with open(path + ".part", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.rename(path + ".part", path)
    return path


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_port(port, limit=30):
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    sys.exit(f"nothing listens on {port}")


def post_reload(admin):
    req = urllib.request.Request(f"http://127.0.0.1:{admin}/reload", method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def status_generation(admin):
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=10) as r:
        return json.loads(r.read())["config"]["generation"]


def control_pid(d):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(f"{d}/upgrade.sock.control")
    s.sendall(b'{"op":"status"}\n')
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return json.loads(data)["pid"]


def measure(routes, reloads=100, soak=1000):
    d = tempfile.mkdtemp(prefix="fanout-bench-reload-")
    port, admin = free_port(), free_port()
    path = conf(d, port, admin, routes, 0)
    log = open(os.path.join(d, "log"), "w")
    p = subprocess.Popen([FANOUT, "-c", path], stdout=subprocess.DEVNULL, stderr=log)
    pids = [p.pid]
    try:
        wait_port(port)
        wait_port(admin)
        rss0, cpu0 = rss_kib(p.pid), cpu_seconds(p.pid)
        times = []
        for i in range(reloads):
            conf(d, port, admin, routes, (i + 1) % 2)
            t0 = time.perf_counter()
            answer = post_reload(admin)
            times.append((time.perf_counter() - t0) * 1000)
            assert answer["result"] == "ok", answer
        cpu = cpu_seconds(p.pid) - cpu0
        # SIGHUP: from the signal to /status showing the next generation (polled every ms).
        hup = []
        for i in range(min(reloads, 50)):
            before = status_generation(admin)
            conf(d, port, admin, routes, i % 2)
            t0 = time.perf_counter()
            os.kill(p.pid, signal.SIGHUP)
            while status_generation(admin) == before:
                if time.perf_counter() - t0 > 30:
                    sys.exit("SIGHUP did not reload within 30 s")
                time.sleep(0.001)
            hup.append((time.perf_counter() - t0) * 1000)
        hup.sort()
        rss_after_100 = rss_kib(p.pid)
        for i in range(soak - reloads):
            conf(d, port, admin, routes, (i + 1) % 2)
            assert post_reload(admin)["result"] == "ok"
        rss_after = rss_kib(p.pid)
        times.sort()
        # The same change by process swap: a listener added, so `fanout reload` upgrades.
        extra = free_port()
        path = conf(d, port, admin, routes, 0, listen_extra=extra)
        peak = 0
        t0 = time.perf_counter()
        r = subprocess.Popen([FANOUT, "reload", "-c", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        while r.poll() is None:
            try:
                new = control_pid(d)
                if new not in pids:
                    pids.append(new)
            except (OSError, ValueError, KeyError):
                pass
            peak = max(peak, sum(rss_kib(x) for x in pids))
            time.sleep(0.01)
        swap_ms = (time.perf_counter() - t0) * 1000
        out, err = r.communicate()
        assert r.returncode == 0, (out, err)
        pids.append(control_pid(d))
        return {
            "routes": routes,
            "p50": statistics.median(times),
            "p99": times[int(len(times) * 0.99) - 1],
            "cpu_ms_per_reload": cpu * 1000 / reloads,
            "hup_p50": statistics.median(hup),
            "hup_p99": hup[max(0, int(len(hup) * 0.99) - 1)],
            "rss_start": rss0 / 1024,
            "rss_100": rss_after_100 / 1024,
            "rss_1000": rss_after / 1024,
            "swap_ms": swap_ms,
            "swap_peak": peak / 1024,
        }
    finally:
        for x in set(pids):
            try:
                os.kill(x, signal.SIGKILL)
            except OSError:
                pass
        p.wait()


def main():
    if not os.path.exists(FANOUT):
        sys.exit("build first: cargo build --release")
    rows = [measure(10), measure(10000, reloads=50, soak=200)]
    print("| routes | POST /reload p50 ms | p99 ms | SIGHUP → serving p50 ms | p99 ms | CPU ms per reload | RSS start → after 100 → after all (MiB) | process swap: until serving ms | swap peak RSS, both processes (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['routes']} | {r['p50']:.1f} | {r['p99']:.1f} | {r['hup_p50']:.1f} | {r['hup_p99']:.1f} | {r['cpu_ms_per_reload']:.1f} | "
              f"{r['rss_start']:.1f} → {r['rss_100']:.1f} → {r['rss_1000']:.1f} | {r['swap_ms']:.0f} | {r['swap_peak']:.1f} |")


if __name__ == "__main__":
    main()
