#!/usr/bin/env python3
"""What OpenTelemetry tracing costs per request: three fanout processes, one worker each,
identical but for `tracing:` (absent; `sample: 0.01`; `sample: 1.0`), over the nginx
backend of bench/run.py, exporting to an OTLP sink (an nginx location that answers 200 to
every POST /v1/traces). wrk -t1 -c64 in alternating rounds; paired ratios per round
against the process without tracing (req/s, and fanout's CPU per request).

Usage: bench/tracing.py [--duration S] [--rounds N]
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402

SINK, ADMIN = 19120, 19121
VARIANTS = {"off": (19011, None), "0.01": (19012, 0.01), "1.0": (19013, 1.0)}


def sink_conf(tmp):
    return run.nginx_head(tmp, "sink") + f"""http {{
  access_log off;
  client_body_temp_path {tmp}/sink_body;
  client_max_body_size 64m;
  server {{ listen 127.0.0.1:{SINK}; location / {{ return 200; }} }}
}}
"""


def fanout_conf(tmp, name, port, sample, admin):
    backends = ", ".join(f"127.0.0.1:{p}" for p in run.BACKENDS)
    tracing = (f"tracing: {{ otlp: \"http://127.0.0.1:{SINK}\", sample: {sample} }}\n"
               if sample is not None else "")
    return run.fanout_server(tmp, name, 1, port) + f"""admin: 127.0.0.1:{admin}
defaults: {{ access_log: off }}
{tracing}upstreams:
  be: {{ backends: [{backends}] }}
routes:
  - {{ match: {{ prefix: / }}, upstream: be }}
"""


def spans(admin):
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=2).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("fanout_tracing_spans_total{"):
            outcome = line.split('outcome="')[1].split('"')[0]
            out[outcome] = int(float(line.split()[-1]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="fanout-tracing-")
    procs = []
    try:
        for d in ["backend_body", "sink_body"]:
            os.makedirs(os.path.join(tmp, d), exist_ok=True)
        for name, text in [("backend.conf", run.backend_conf(tmp)), ("sink.conf", sink_conf(tmp))]:
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        procs.append(run.start(["nginx", "-c", f"{tmp}/backend.conf"], "backend", run.BACKENDS[0], tmp))
        procs.append(run.start(["nginx", "-c", f"{tmp}/sink.conf"], "sink", SINK, tmp))
        proxies = {}
        for i, (name, (port, sample)) in enumerate(VARIANTS.items()):
            path = os.path.join(tmp, f"{name}.yaml")
            with open(path, "w") as f:
                f.write(fanout_conf(tmp, f"f{i}", port, sample, ADMIN + i))
            proxies[name] = run.start([run.FANOUT, "-c", path], f"f{i}", port, tmp)
            procs.append(proxies[name])
        results = {name: [] for name in VARIANTS}
        order = list(VARIANTS)
        for r in range(args.rounds):
            for name in order:
                res = run.run_wrk(VARIANTS[name][0], 64, args.duration, None, tmp, proxies[name])
                results[name].append(res)
                print(f"  round {r + 1} {name:5} {res['rps']:8.0f} req/s  p99 {res['p99']:.2f} ms  "
                      f"CPU {res['cpu_us']:.1f} µs/req", flush=True)
            order = order[1:] + order[:1]
        print(f"\n# {time.strftime('%Y-%m-%d')}: bench/tracing.py --duration {args.duration} --rounds {args.rounds}")
        print("| tracing | req/s (median) | p99 ms | CPU µs/req | req/s vs off (paired) | CPU vs off (paired) "
              "| spans exported / dropped / failed |")
        print("|---|---|---|---|---|---|---|")
        for i, name in enumerate(VARIANTS):
            rs = results[name]
            med = lambda k: statistics.median(x[k] for x in rs)
            pairs = [(a["rps"] / b["rps"], a["cpu_us"] / b["cpu_us"]) for a, b in zip(rs, results["off"])]
            s = spans(ADMIN + i)
            print(f"| {name} | {med('rps'):.0f} | {med('p99'):.2f} | {med('cpu_us'):.1f} | "
                  f"{statistics.median(p[0] for p in pairs):.3f}× | {statistics.median(p[1] for p in pairs):.3f}× | "
                  f"{s.get('exported', 0)} / {s.get('dropped', 0)} / {s.get('failed', 0)} |")
    finally:
        run.stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
