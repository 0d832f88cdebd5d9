#!/usr/bin/env python3
"""The cost of a rate-limit decision taken in Redis (`rate_limit.store: redis`) against one
taken in the process (`store: local`), and the largest decision rate one Redis sustains
here. `make bench-redis`.

1. Three fanout processes, identical but for `store:` (local, redis, and redis with
   `lease: 1000`) (one worker each, a limit far above
   what wrk offers, so every request is allowed and every one is decided), over the nginx
   backend of bench/run.py, measured with wrk in alternating rounds (local, redis, redis,
   local, ...): req/s, p50/p99 and fanout's CPU per request, and the paired ratio.
2. redis-benchmark running the same GCRA script (EVALSHA, random keys) with 50 clients:
   decisions per second of one Redis (single-threaded) on this machine.

Usage: bench/redis_limits.py [--duration S] [--rounds N]
"""
import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402

PORTS = {"local": 19011, "redis": 19012, "leased": 19014}
REDIS_PORT = 19013
ROOT = run.ROOT


def gcra_script():
    """The script fanout runs, read from its source so both measure the same thing."""
    src = open(os.path.join(ROOT, "src", "ratelimit", "shared.rs")).read()
    return re.search(r'const GCRA: &str = r"(.*?)";', src, re.S).group(1)


def conf(tmp, name, store):
    lease = ", lease: 1000" if store == "leased" else ""
    store = "redis" if store == "leased" else store
    backends = ", ".join(f"127.0.0.1:{p}" for p in run.BACKENDS)
    return run.fanout_server(tmp, name, 1, PORTS[name]) + f"""redis: {{ url: "redis://127.0.0.1:{REDIS_PORT}", pool: 4, timeout: 50ms }}
defaults: {{ access_log: off }}
upstreams:
  be: {{ backends: [{backends}] }}
routes:
  - name: limited
    match: {{ prefix: / }}
    upstream: be
    rate_limit: {{ requests_per_second: 1000000, burst: 1000000, key: client_ip, store: {store}{lease} }}
"""


def wait_redis(proc):
    deadline = time.time() + 10
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit("redis-server exited early")
        try:
            with socket.create_connection(("127.0.0.1", REDIS_PORT), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            time.sleep(0.05)
    sys.exit("redis-server did not answer")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="fanout-bench-redis-")
    procs = []
    try:
        redis = subprocess.Popen(["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1",
                                  "--save", "", "--appendonly", "no", "--dir", tmp],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(redis)
        wait_redis(redis)
        with open(os.path.join(tmp, "backend.conf"), "w") as f:
            f.write(run.backend_conf(tmp))
        for d in ["backend_body"]:
            os.makedirs(os.path.join(tmp, d), exist_ok=True)
        procs.append(run.start(["nginx", "-c", f"{tmp}/backend.conf"], "backend", run.BACKENDS[0], tmp))
        gws = {}
        for name in PORTS:
            path = os.path.join(tmp, f"{name}.yaml")
            with open(path, "w") as f:
                f.write(conf(tmp, name, name))
            gws[name] = run.start([run.FANOUT, "-c", path], name, PORTS[name], tmp)
            procs.append(gws[name])
        results = {n: [] for n in PORTS}
        order = list(PORTS)
        for r in range(args.rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                res = run.run_wrk(PORTS[name], 64, args.duration, None, tmp, gws[name])
                if res["errors"]:
                    sys.exit(f"{name}: {res['errors']} errors (a limit was hit?)")
                results[name].append(res)
                print(f"  round {r + 1} {name:6} {res['rps']:>9.0f} req/s  p50 {res['p50']:.2f} ms  "
                      f"p99 {res['p99']:.2f} ms  CPU {res['cpu_us']:.1f} µs/req", file=sys.stderr)
        print(f"# {time.strftime('%Y-%m-%d')}, bench/redis_limits.py --duration {args.duration} "
              f"--rounds {args.rounds} (wrk -t1 -c64, one fanout worker each)")
        print("| store | req/s (median) | p50 ms | p99 ms | fanout CPU µs/req |")
        print("|---|---|---|---|---|")
        for name in PORTS:
            med = {k: statistics.median(x[k] for x in results[name]) for k in ["rps", "p50", "p99", "cpu_us"]}
            print(f"| {name} | {med['rps']:.0f} | {med['p50']:.2f} | {med['p99']:.2f} | {med['cpu_us']:.1f} |")
        for other in ["redis", "leased"]:
            pairs = [(b["rps"] / a["rps"], b["cpu_us"] / a["cpu_us"])
                     for a, b in zip(results["local"], results[other])]
            print(f"\n{other} / local, paired by round: {statistics.median(p[0] for p in pairs):.3f}× req/s, "
                  f"{statistics.median(p[1] for p in pairs):.3f}× CPU per request")
        redis_cpu = run.cpu_seconds(redis.pid)
        print(f"redis-server CPU over the whole run: {redis_cpu:.1f} s")

        # One Redis's ceiling: the same script from redis-benchmark, 50 clients, random keys.
        sha = subprocess.run(["redis-cli", "-p", str(REDIS_PORT), "SCRIPT", "LOAD", gcra_script()],
                             capture_output=True, text=True, check=True).stdout.strip()
        out = subprocess.run(["redis-benchmark", "-p", str(REDIS_PORT), "-c", "50", "-n", "300000", "-r", "100000",
                              "-q", "EVALSHA", sha, "1", "fanout:rl:bench:__rand_int__", "1", "1000000", "1"],
                             capture_output=True, text=True, timeout=300).stdout
        rate = re.findall(r"([\d.]+) requests per second", out)
        print(f"redis-benchmark EVALSHA (the GCRA script), -c 50, random keys: "
              f"{rate[-1] if rate else '?'} decisions/s")
    finally:
        run.stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
