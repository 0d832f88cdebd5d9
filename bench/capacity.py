#!/usr/bin/env python3
"""Overload of an upstream (issue 30): what a gateway does when an upstream is offered more
than it can serve. Three parts, each printing a Markdown table:

1. capacity: an upstream of fixed capacity (examples/slow_backend: 8 requests at a time,
   20 ms each, so 400 req/s; the rest wait in its queue, as behind a worker pool) behind
   fanout (`concurrency:`), plain Pingora and nginx, one worker each, offered 0.5x, 1.5x and
   3x its capacity in an open loop (oha -q with --latency-correction: a request's latency
   counts from when it was due). Per proxy and load: 2xx/s (goodput), p50/p99 of the 2xx
   answers, the slowest refusal (503) and how many there were.
2. slowdown: two upstreams behind one fanout, both answering in 1 ms; after 10 s the first
   slows to 500 ms per request. Every 0.5 s its concurrency limit is read from /metrics;
   the second's routes are loaded throughout and their p50/p99 are reported before and
   after the slowdown.
3. retries: an upstream of two backends, one refusing every connect (its breaker never
   opens here), `retries: 2`, with and without `retry_budget: 20%`; closed loop (wrk, 16
   connections, 5 s): attempts upstream per client request.

Usage: bench/capacity.py [--duration S] [--parts capacity,slowdown,retries]
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402
from overload import OHA  # noqa: E402

CAP_PORT, FAST_A, FAST_B, ADMIN = 19111, 19112, 19113, 19119
SLOTS, DELAY_MS = 8, 20
CAPACITY = SLOTS * 1000 / DELAY_MS
QUEUE_WAIT_MS = 20


def oha(url, rate, duration, connections=256):
    """An open-loop run: 2xx/s, percentiles of the 2xx and of the others (ms)."""
    out = subprocess.run(
        [OHA, "-z", f"{duration}s", "-q", str(int(rate)), "-c", str(connections), "-t", "5s",
         "--latency-correction", "--stats-success-breakdown", "--no-tui",
         "--output-format", "json", url],
        capture_output=True, text=True, timeout=duration + 120)
    r = json.loads(out.stdout)
    codes = r.get("statusCodeDistribution", {})
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    ms = lambda v: v * 1000 if v is not None else float("nan")
    good = r.get("latencyPercentilesSuccessful") or r["latencyPercentiles"]
    bad = r.get("latencyPercentilesNotSuccessful") or {}
    errors = r.get("errorDistribution", {})
    cut = errors.pop("aborted due to deadline", 0)
    return {"goodput": ok / duration, "p50": ms(good.get("p50")), "p99": ms(good.get("p99")),
            "refused": sum(codes.values()) - ok, "refused_p99": ms(bad.get("p99")),
            "refused_max": ms(bad.get("p99.99")), "cut": cut,
            "errors": ", ".join(f"{k}: {v}" for k, v in errors.items()) or "none"}


def write(tmp, name, text):
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def nginx_conf(tmp, backend):
    return run.nginx_head(tmp, "nginx") + f"""http {{
  access_log off;
  proxy_temp_path {tmp}/nginx_proxy;
  upstream be {{ server 127.0.0.1:{backend}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{run.PORTS['nginx']};
    location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
"""


def capacity(tmp, duration):
    procs = []
    try:
        procs.append(run.start([run.SLOW, str(CAP_PORT), str(DELAY_MS), str(SLOTS)], "cap", CAP_PORT, tmp))
        os.makedirs(os.path.join(tmp, "nginx_proxy"), exist_ok=True)
        fanout = run.fanout_server(tmp, "fanout", 1, run.PORTS["fanout"]) + f"""defaults: {{ access_log: off }}
upstreams:
  cap:
    backends: [127.0.0.1:{CAP_PORT}]
    concurrency: {{ min: 4, max: 200, max_queue_wait: {QUEUE_WAIT_MS}ms }}
routes:
  - {{ match: {{ prefix: / }}, upstream: cap }}
"""
        os.environ["THREADS"] = "1"
        proxies = {
            "fanout": [run.FANOUT, "-c", write(tmp, "fanout.yaml", fanout)],
            "pingora": [run.PLAIN, f"127.0.0.1:{run.PORTS['pingora']}", f"127.0.0.1:{CAP_PORT}"],
            "nginx": ["nginx", "-c", write(tmp, "nginx.conf", nginx_conf(tmp, CAP_PORT))],
        }
        for name, cmd in proxies.items():
            procs.append(run.start(cmd, name, run.PORTS[name], tmp))
        print(f"\n### An upstream of fixed capacity ({SLOTS} at a time x {DELAY_MS} ms = "
              f"{CAPACITY:.0f} req/s), {duration} s per load, fanout max_queue_wait "
              f"{QUEUE_WAIT_MS} ms\n")
        print("| proxy | offered | 2xx/s | of capacity | 2xx p50 ms | 2xx p99 ms | refused (503) "
              "| refusal p99 / p99.99 ms | in flight at the end | errors |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for factor in (0.5, 1.5, 3.0):
            for name in proxies:
                r = oha(f"http://127.0.0.1:{run.PORTS[name]}/x", CAPACITY * factor, duration)
                print(f"| {name} | {factor}x ({CAPACITY * factor:.0f}/s) | {r['goodput']:.0f} | "
                      f"{r['goodput'] / CAPACITY:.0%} | {r['p50']:.1f} | {r['p99']:.1f} | "
                      f"{r['refused']} | {r['refused_p99']:.1f} / {r['refused_max']:.1f} | "
                      f"{r['cut']} | {r['errors']} |", flush=True)
                time.sleep(6)  # the backend's queue drains (5 s client timeouts)
    finally:
        run.stop(procs)


def metric(port, series):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return float("nan")


def slowdown(tmp, duration):
    procs = []
    slow_after = 10
    total = slow_after + max(duration, 10)
    try:
        procs.append(run.start([run.SLOW, str(FAST_A), "1", "0", str(slow_after), "500"], "a", FAST_A, tmp))
        procs.append(run.start([run.SLOW, str(FAST_B), "1"], "b", FAST_B, tmp))
        conf = run.fanout_server(tmp, "fanout", 2, run.PORTS["fanout"]) + f"""admin: 127.0.0.1:{ADMIN}
defaults: {{ access_log: off }}
upstreams:
  a: {{ backends: [127.0.0.1:{FAST_A}], concurrency: {{ min: 4, max: 500, max_queue_wait: 20ms }} }}
  b: {{ backends: [127.0.0.1:{FAST_B}], concurrency: {{ min: 4, max: 500, max_queue_wait: 20ms }} }}
routes:
  - {{ match: {{ prefix: /a }}, upstream: a }}
  - {{ match: {{ prefix: /b }}, upstream: b }}
"""
        procs.append(run.start([run.FANOUT, "-c", write(tmp, "slowdown.yaml", conf)], "fanout",
                               run.PORTS["fanout"], tmp))
        base = f"http://127.0.0.1:{run.PORTS['fanout']}"
        limits = []
        series = 'fanout_upstream_concurrency_limit{upstream="a"}'
        a_load = threading.Thread(target=oha, args=(base + "/a", 400, total))
        a_load.start()
        t0 = time.time()

        def poll():
            while a_load.is_alive():
                limits.append((time.time() - t0, metric(ADMIN, series)))
                time.sleep(0.5)
        poller = threading.Thread(target=poll)
        poller.start()
        before = oha(base + "/b", 400, slow_after - 1)
        time.sleep(max(0.0, slow_after - (time.time() - t0)))
        after = oha(base + "/b", 400, total - slow_after - 1)
        a_load.join()
        poller.join()
        peak = max((v for t, v in limits if t < slow_after), default=float("nan"))
        fell = next((t - slow_after for t, v in limits if t > slow_after and v <= max(4, peak / 4)), None)
        print(f"\n### Upstream a slows from 1 ms to 500 ms after {slow_after} s (400 req/s to a, "
              f"400 req/s to b, fanout 2 workers)\n")
        print("| | b 2xx/s | b p50 ms | b p99 ms | b refused |")
        print("|---|---|---|---|---|")
        for label, r in (("before", before), ("after", after)):
            print(f"| {label} | {r['goodput']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['refused']} |")
        trace = ", ".join(f"{t:.1f}s: {v:.0f}" for t, v in limits[::2])
        print(f"\na's limit: highest before the slowdown {peak:.0f}; "
              f"at or below max(4, a quarter of it) {fell:.1f} s after it" if fell is not None
              else f"\na's limit never fell (highest {peak:.0f})")
        print(f"\na's limit over time: {trace}", flush=True)
    finally:
        run.stop(procs)


def retries(tmp, duration):
    procs = []
    try:
        procs.append(run.start([run.SLOW, str(FAST_B), "1"], "b", FAST_B, tmp))
        dead = FAST_A
        print("\n### A half-failing upstream (one backend of two refuses connects), retries: 2, "
              f"wrk -c16 {duration} s\n")
        print("| retry_budget | client requests | upstream attempts | attempts per request "
              "| retries shed | failed client requests (502) |")
        print("|---|---|---|---|---|---|")
        for budget in ("", "20%"):
            key = f", retry_budget: {budget}" if budget else ""
            conf = run.fanout_server(tmp, "fanout", 1, run.PORTS["fanout"]) + f"""admin: 127.0.0.1:{ADMIN}
defaults: {{ access_log: off }}
upstreams:
  u: {{ retries: 2{key}, backends: [127.0.0.1:{dead}, 127.0.0.1:{FAST_B}], breaker: {{ failures: 100000000, open: 1s }} }}
routes:
  - {{ match: {{ prefix: / }}, upstream: u }}
"""
            proc = run.start([run.FANOUT, "-c", write(tmp, "retries.yaml", conf)], "fanout",
                             run.PORTS["fanout"], tmp)
            try:
                res = run.wrk(run.PORTS["fanout"], 16, duration, None, tmp)
                text = urllib.request.urlopen(f"http://127.0.0.1:{ADMIN}/metrics", timeout=2).read().decode()
                attempts = sum(float(m) for m in re.findall(
                    r'^fanout_upstream_requests_total\{[^}]*upstream="u"[^}]*\} (\S+)', text, re.M))
                shed = metric(ADMIN, 'fanout_shed_total{reason="retry_budget",upstream="u"}')
                print(f"| {budget or 'none'} | {res['requests']} | {attempts:.0f} | "
                      f"{attempts / max(res['requests'], 1):.2f} | "
                      f"{0 if shed != shed else shed:.0f} | {res['errors']} |", flush=True)
            finally:
                run.stop([proc])
    finally:
        run.stop(procs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=20)
    ap.add_argument("--parts", default="capacity,slowdown,retries")
    args = ap.parse_args()
    if not os.path.exists(OHA):
        sys.exit("oha not found: make bench-overload installs it")
    tmp = tempfile.mkdtemp(prefix="fanout-capacity-")
    print(f"# {time.strftime('%Y-%m-%d')}: bench/capacity.py --duration {args.duration} "
          f"--parts {args.parts}")
    try:
        parts = args.parts.split(",")
        if "capacity" in parts:
            capacity(tmp, args.duration)
        if "slowdown" in parts:
            slowdown(tmp, args.duration)
        if "retries" in parts:
            retries(tmp, min(args.duration, 5))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
