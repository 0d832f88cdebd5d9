#!/usr/bin/env python3
"""Runs wrk against fanout, nginx (proxy_pass, upstream keepalive), HAProxy (http-reuse
always) and a plain Pingora load balancer (examples/plain_pingora.rs) in alternating rounds
(A B C D A B C D ...) over the same nginx backends, and prints a Markdown table of median
req/s, p50, p99, errors and fanout's ratios. Mirror scenarios compare fanout with nginx's
`mirror` only.

Every process listens on 127.0.0.1 only. Usage: bench/run.py [--duration S] [--rounds N]
[--scenarios ka1,ka2,close,post1k,post64k,post1m,log,mirror-fast,...]

The cost of mirror comparison, paired round by round (fanout with `compare`, "base" the same
build without it): bench/run.py --compare-cost --only fanout,base --scenarios mirror-compare
"""
import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
# FANOUT_BIN: another fanout binary to measure (e.g. an earlier build, for before/after).
FANOUT = os.environ.get("FANOUT_BIN") or os.path.join(ROOT, "target", "release", "fanout")
# FANOUT_BASE: an earlier fanout build measured in the same rounds as target "base", so a
# before/after comparison shares the machine's noise instead of comparing two runs.
BASE = os.environ.get("FANOUT_BASE")
# --compare-cost: the cost of mirror `compare`, paired: "base" is this same build with the
# same mirror but without `compare`, measured in the same rounds as "fanout" (with it).
COMPARE_COST = False
BACKENDS = [19101, 19102]
PORTS = {"fanout": 19001, "nginx": 19002, "haproxy": 19003, "pingora": 19004, "base": 19005}
PLAIN = os.path.join(ROOT, "target", "release", "examples", "plain_pingora")
SLOW = os.path.join(ROOT, "target", "release", "examples", "slow_backend")
# Mirror targets: another port of the nginx backend, a 1 s asyncio server, nothing at all.
MIRRORS = {"fast": 19103, "slow": 19104, "dead": 19105}

# name: (description, workers, connections, lua script or None, access log on, mirror)
SCENARIOS = {
    "ka1": ("keep-alive, 64 connections, 1 worker", 1, 64, None, False, None),
    "ka2": ("keep-alive, 64 connections, 2 workers", 2, 64, None, False, None),
    "close": ("no client keep-alive (Connection: close), 1 worker", 1, 64, "close.lua", False, None),
    "post1k": ("POST 1 KiB bodies, 64 connections, 1 worker", 1, 64, "post1k.lua", False, None),
    "post64k": ("POST 64 KiB bodies, 16 connections, 1 worker", 1, 16, "post64k.lua", False, None),
    "post1m": ("POST 1 MiB bodies, 16 connections, 1 worker", 1, 16, "post1m.lua", False, None),
    "log": ("keep-alive, 64 connections, 1 worker, access log to a file", 1, 64, None, True, None),
    "mirror-fast": ("100% mirror to a fast target, 1 worker", 1, 64, None, False, "fast"),
    "mirror-slow": ("100% mirror to a 1 s target, 1 worker", 1, 64, None, False, "slow"),
    "mirror-dead": ("100% mirror to a dead port, 1 worker", 1, 64, None, False, "dead"),
    "mirror-dead2": ("100% mirror to a dead port, 2 workers", 2, 64, None, False, "dead"),
    # The same mirror with `compare` on every copy: its cost against mirror-fast (fanout only:
    # no peer compares); run with --only fanout --scenarios mirror-fast,mirror-compare.
    "mirror-compare": ("100% mirror to a fast target, answers compared, 1 worker", 1, 64, None, False, "fast-compare"),
    "mirror-post": ("100% mirror of 1 KiB POSTs to a fast target, 1 worker", 1, 64, "post1k.lua", False, "fast"),
}


def wait_port(port, proc, name, limit=15.0):
    deadline = time.time() + limit
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{name} exited early with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{name} did not listen on {port}")


def nginx_head(tmp, name, workers=1):
    """The top of an nginx configuration: one process in the foreground, its files in tmp."""
    return f"""worker_processes {workers};
daemon off;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}.err;
events {{ worker_connections 8192; }}
"""


def backend_conf(tmp):
    listens = "\n".join(f"    listen 127.0.0.1:{p} reuseport;" for p in BACKENDS + [MIRRORS["fast"]])
    return nginx_head(tmp, "backend") + f"""http {{
  access_log off;
  client_max_body_size 20m;
  client_body_temp_path {tmp}/backend_body;
  keepalive_requests 1000000;
  server {{
{listens}
    location / {{ return 200 "ok\\n"; }}
  }}
}}
"""


def nginx_conf(tmp, workers, log, mirror):
    servers = "\n".join(f"    server 127.0.0.1:{p};" for p in BACKENDS)
    access = f"access_log {tmp}/nginx_access.log;" if log else "access_log off;"
    mirror_in = "mirror /_mirror; mirror_request_body on;" if mirror else ""
    mirror_loc = (f"location = /_mirror {{ internal; proxy_pass http://127.0.0.1:{MIRRORS[mirror.removesuffix('-compare')]}$request_uri; "
                  f"proxy_http_version 1.1; proxy_set_header Connection \"\"; }}") if mirror else ""
    return nginx_head(tmp, "nginx", workers) + f"""http {{
  {access}
  client_max_body_size 20m;
  client_body_temp_path {tmp}/nginx_body;
  proxy_temp_path {tmp}/nginx_proxy;
  keepalive_requests 1000000;
  upstream be {{
{servers}
    keepalive 256;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{PORTS['nginx']};
    location / {{
      {mirror_in}
      proxy_pass http://be;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_request_buffering off;
    }}
    {mirror_loc}
  }}
}}
"""


def haproxy_conf(workers):
    servers = "\n".join(f"  server s{i} 127.0.0.1:{p}" for i, p in enumerate(BACKENDS))
    return f"""global
  nbthread {workers}
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:{PORTS['haproxy']}
  default_backend be
backend be
  balance roundrobin
{servers}
"""


def fanout_server(tmp, name, workers, port):
    """The `server:` and `listen:` of a benchmarked fanout: `workers` threads, its files in
    tmp, no grace period (the benchmarks stop it with SIGTERM)."""
    return f"""server:
  threads: {workers}
  work_stealing: true
  upstream_keepalive_pool_size: 1024
  pid_file: {tmp}/{name}.pid
  upgrade_sock: {tmp}/{name}.sock
  grace_period_seconds: 0
  graceful_shutdown_timeout_seconds: 1
listen: ["127.0.0.1:{port}"]
"""


def fanout_conf(tmp, workers, log, mirror, name="fanout"):
    backends = ", ".join(f"127.0.0.1:{p}" for p in BACKENDS)
    shadow = (f"  shadow: {{ backends: [127.0.0.1:{MIRRORS[mirror.removesuffix('-compare')]}] }}\n"
              if mirror else "")
    compared = mirror and mirror.endswith("-compare") and not (COMPARE_COST and name == "base")
    compare = ", compare: { ignore_headers: [Date, X-Request-Id] }" if compared else ""
    mirror_route = (f"    mirror: [{{ upstream: shadow, percent: 100, max_inflight: 1024, timeout: 5s{compare} }}]\n"
                    if mirror else "")
    return fanout_server(tmp, name, workers, PORTS[name]) + f"""defaults:
  max_body_bytes: 20MiB
  access_log: {"json" if log else "off"}
upstreams:
  be:
    balance: round_robin
    backends: [{backends}]
{shadow}routes:
  - match: {{ prefix: / }}
    upstream: be
{mirror_route}"""


def cpu_seconds(pid):
    """User and system CPU time a process (all its threads) and its live children (nginx's
    workers) have used so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return total + sum(cpu_seconds(int(c)) for c in f.read().split())


def run_wrk(port, connections, duration, script, tmp, proc):
    """One wrk run, with the CPU time the proxy `proc` spent per request (µs): a figure
    that the machine's noise moves less than req/s."""
    cpu = cpu_seconds(proc.pid)
    res = wrk(port, connections, duration, script, tmp)
    res["cpu_us"] = (cpu_seconds(proc.pid) - cpu) * 1e6 / max(res["requests"], 1)
    return res


def wrk(port, connections, duration, script, tmp):
    report = open(os.path.join(BENCH, "report.lua")).read()
    body = open(os.path.join(BENCH, script)).read() if script else ""
    path = os.path.join(tmp, "wrk.lua")
    with open(path, "w") as f:
        f.write(body + "\n" + report)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", path,
         f"http://127.0.0.1:{port}/bench"],
        capture_output=True, text=True, timeout=duration + 60)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT"):
            fields = dict(kv.split("=") for kv in line.split()[1:])
            # report.lua's errors include the non-2xx/3xx answers (wrk's status errors).
            return {"rps": float(fields["rps"]), "p50": float(fields["p50_ms"]),
                    "p99": float(fields["p99_ms"]), "errors": int(fields["errors"]),
                    "requests": int(fields["requests"])}
    sys.exit(f"wrk gave no result:\n{out.stdout}\n{out.stderr}")


def start(cmd, name, port, tmp, stdout=None):
    log = open(os.path.join(tmp, f"{name}.stderr"), "w")
    proc = subprocess.Popen(cmd, stdout=stdout or subprocess.DEVNULL, stderr=log)
    wait_port(port, proc, name)
    return proc


def stop(procs):
    """Terminates every process, killing those that do not exit within 10 s."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


def peak_rss_mib(proc):
    for line in open(f"/proc/{proc.pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_ka1_trio(tmp, backend_text, procs):
    """The ka1 set-up for the one-worker comparisons of bench/decompose.py and
    bench/overload.py: the backends (`backend_text`: their nginx configuration), then fanout,
    plain Pingora and nginx, each with one worker. Every process started is added to
    `procs`; returns the three proxies by name."""
    for fname, text in [("backend.conf", backend_text), ("nginx.conf", nginx_conf(tmp, 1, False, None)),
                        ("fanout.yaml", fanout_conf(tmp, 1, False, None))]:
        with open(os.path.join(tmp, fname), "w") as f:
            f.write(text)
    for d in ["backend_body", "nginx_body", "nginx_proxy"]:
        os.makedirs(os.path.join(tmp, d), exist_ok=True)
    procs.append(start(["nginx", "-c", f"{tmp}/backend.conf"], "backend", BACKENDS[0], tmp))
    os.environ["THREADS"] = "1"
    proxies = {}
    for name, cmd in [("fanout", [FANOUT, "-c", f"{tmp}/fanout.yaml"]),
                      ("pingora", [PLAIN, f"127.0.0.1:{PORTS['pingora']}"] + [f"127.0.0.1:{p}" for p in BACKENDS]),
                      ("nginx", ["nginx", "-c", f"{tmp}/nginx.conf"])]:
        proxies[name] = start(cmd, name, PORTS[name], tmp)
        procs.append(proxies[name])
    return proxies


def scenario(name, duration, rounds, tmp, only=None):
    desc, workers, conns, script, log, mirror = SCENARIOS[name]
    targets = ["fanout", "nginx"] if mirror else ["fanout", "nginx", "haproxy", "pingora"]
    if BASE:
        targets.insert(1, "base")
    targets = [t for t in targets if not only or t in only]
    procs = []
    try:
        for fname, text in [("backend.conf", backend_conf(tmp)), ("nginx.conf", nginx_conf(tmp, workers, log, mirror)),
                            ("haproxy.cfg", haproxy_conf(workers)), ("fanout.yaml", fanout_conf(tmp, workers, log, mirror))]:
            with open(os.path.join(tmp, fname), "w") as f:
                f.write(text)
        for d in ["backend_body", "nginx_body", "nginx_proxy"]:
            os.makedirs(os.path.join(tmp, d), exist_ok=True)
        procs.append(start(["nginx", "-c", f"{tmp}/backend.conf"], "backend", BACKENDS[0], tmp))
        proxies = {"nginx": start(["nginx", "-c", f"{tmp}/nginx.conf"], "nginx", PORTS["nginx"], tmp)}
        procs.append(proxies["nginx"])
        if not mirror:
            proxies["haproxy"] = start(["haproxy", "-f", f"{tmp}/haproxy.cfg"], "haproxy", PORTS["haproxy"], tmp)
            os.environ["THREADS"] = str(workers)
            proxies["pingora"] = start([PLAIN, f"127.0.0.1:{PORTS['pingora']}"] + [f"127.0.0.1:{p}" for p in BACKENDS],
                                       "pingora", PORTS["pingora"], tmp)
            procs += [proxies["haproxy"], proxies["pingora"]]
        if mirror == "slow":
            procs.append(start([SLOW, str(MIRRORS["slow"]), "1000"], "slow", MIRRORS["slow"], tmp))
        fanout_out = open(os.path.join(tmp, "fanout_access.log"), "w") if log else None
        fanout = start([FANOUT, "-c", f"{tmp}/fanout.yaml"], "fanout", PORTS["fanout"], tmp, stdout=fanout_out)
        procs.append(fanout)
        proxies["fanout"] = fanout
        if BASE:
            with open(os.path.join(tmp, "base.yaml"), "w") as f:
                f.write(fanout_conf(tmp, workers, log, mirror, "base"))
            proxies["base"] = start([BASE, "-c", f"{tmp}/base.yaml"], "base", PORTS["base"], tmp)
            procs.append(proxies["base"])
        results = {k: [] for k in targets}
        for r in range(rounds):
            # Every other round in reverse, so that no proxy always follows the same one.
            for target in (targets if r % 2 == 0 else targets[::-1]):
                res = run_wrk(PORTS[target], conns, duration, script, tmp, proxies[target])
                results[target].append(res)
                print(f"  {name} round {r + 1} {target:8} {res['rps']:>10.0f} req/s  p50 {res['p50']:.2f} ms"
                      f"  p99 {res['p99']:.2f} ms  errors {res['errors']}  CPU {res['cpu_us']:.1f} µs/req",
                      file=sys.stderr)
        return desc, results, peak_rss_mib(fanout)
    finally:
        stop(procs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compare-cost", action="store_true",
                    help="measure base = this build without mirror compare, paired with fanout")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--only", help="measure only these proxies, e.g. fanout,base")
    args = ap.parse_args()
    global BASE, COMPARE_COST
    if args.compare_cost:
        BASE, COMPARE_COST = FANOUT, True
    if not os.path.exists(FANOUT):
        sys.exit("build fanout first: make build")
    tmp = tempfile.mkdtemp(prefix="fanout-bench-")
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"# {time.strftime('%Y-%m-%d')}, nproc {os.cpu_count()}, {cpu}")
    extra = (" --compare-cost" if args.compare_cost else "") + (f" --only {args.only}" if args.only else "")
    print(f"# bench/run.py --duration {args.duration} --rounds {args.rounds} --scenarios {args.scenarios}{extra}")
    base = " | req/s vs base (paired) | CPU vs base (paired)" if BASE else ""
    print(f"| scenario | proxy | req/s (median) | p50 ms | p99 ms | errors | CPU µs/req | vs nginx | vs HAProxy "
          f"| vs plain Pingora{base} |")
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if BASE else ""))
    try:
        for name in args.scenarios.split(","):
            desc, results, rss = scenario(name, args.duration, args.rounds, tmp,
                                          args.only.split(",") if args.only else None)
            med = {t: {k: statistics.median(r[k] for r in rs) for k in ["rps", "p50", "p99", "cpu_us"]}
                   for t, rs in results.items()}
            for t in results:
                errors = sum(r["errors"] for r in results[t])
                ratio = lambda other: (f"{med[t]['rps'] / med[other]['rps']:.2f}×"
                                       if t in ("fanout", "base") and other in med else "")
                label = f"{desc} (fanout peak RSS {rss:.0f} MiB)" if t == "fanout" else ""
                vs_base = ""
                if BASE:
                    # The median of each round's pair: both ran back to back, in the same noise.
                    pairs = [(f["rps"] / b["rps"], f["cpu_us"] / b["cpu_us"])
                             for f, b in zip(results["fanout"], results["base"])]
                    rps_pair = statistics.median(p[0] for p in pairs)
                    cpu = f"{statistics.median(p[1] for p in pairs):.3f}×" if t == "fanout" else ""
                    vs_base = f" {f'{rps_pair:.3f}×' if t == 'fanout' else ''} | {cpu} |"
                print(f"| {label} | {t} | {med[t]['rps']:.0f} | {med[t]['p50']:.2f} | "
                      f"{med[t]['p99']:.2f} | {errors} | {med[t]['cpu_us']:.1f} | {ratio('nginx')} | {ratio('haproxy')} "
                      f"| {ratio('pingora')} |" + vs_base, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
