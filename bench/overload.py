#!/usr/bin/env python3
"""Tail latency under overload: fanout, plain Pingora (examples/plain_pingora.rs) and nginx,
one worker each, in front of bench/run.py's backends. For each proxy its saturation is
measured first (wrk, closed loop, 64 keep-alive connections), then an open-loop load of
1.5x that rate is offered for the duration (oha -q, with --latency-correction so that a
request's latency counts from when it was due, not from when a connection was free; 256
keep-alive connections; 5 s timeout per request). Prints p50, p99, p99.9, the rate
achieved and what failed.

oha comes from crates.io (`make bench-overload` installs it into bench/.tools).
Usage: bench/overload.py [--duration S] [--factor F] [--connections N]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402

OHA = shutil.which("oha") or os.path.join(run.BENCH, ".tools", "bin", "oha")


def oha(port, rate, duration, connections):
    out = subprocess.run(
        [OHA, "-z", f"{duration}s", "-q", str(int(rate)), "-c", str(connections), "-t", "5s",
         "--latency-correction", "--no-tui", "--output-format", "json",
         f"http://127.0.0.1:{port}/bench"],
        capture_output=True, text=True, timeout=duration + 120)
    r = json.loads(out.stdout)
    codes = r.get("statusCodeDistribution", {})
    errors = r.get("errorDistribution", {})
    ok = sum(v for k, v in codes.items() if k.startswith("2"))
    p = r["latencyPercentiles"]
    ms = lambda v: v * 1000 if v is not None else float("nan")
    return {"achieved": ok / r["summary"]["total"], "p50": ms(p["p50"]), "p99": ms(p["p99"]),
            "p999": ms(p["p99.9"]), "ok": ok, "non2xx": sum(codes.values()) - ok,
            "errors": sum(errors.values()), "error_kinds": errors}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--factor", type=float, default=1.5)
    ap.add_argument("--connections", type=int, default=256)
    args = ap.parse_args()
    if not os.path.exists(OHA):
        sys.exit("oha not found: make bench-overload installs it")
    tmp = tempfile.mkdtemp(prefix="fanout-overload-")
    procs = []
    try:
        proxies = run.start_ka1_trio(tmp, run.backend_conf(tmp), procs)
        print(f"# {time.strftime('%Y-%m-%d')}: bench/overload.py --duration {args.duration} "
              f"--factor {args.factor} --connections {args.connections}")
        print("| proxy | saturation req/s (wrk) | offered req/s | answered 2xx/s | p50 ms | p99 ms "
              "| p99.9 ms | non-2xx | errors (timeouts, resets) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, proc in proxies.items():
            port = run.PORTS[name]
            sat = run.wrk(port, 64, 5, None, tmp)["rps"]
            time.sleep(1)
            rate = sat * args.factor
            r = oha(port, rate, args.duration, args.connections)
            kinds = ", ".join(f"{k}: {v}" for k, v in r["error_kinds"].items()) or "none"
            print(f"| {name} | {sat:.0f} | {rate:.0f} | {r['achieved']:.0f} | {r['p50']:.1f} | "
                  f"{r['p99']:.1f} | {r['p999']:.1f} | {r['non2xx']} | {r['errors']} ({kinds}) |", flush=True)
            time.sleep(2)
    finally:
        run.stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
