#!/usr/bin/env python3
"""The broadcast spool's cost: accepted requests per second, the 202's latency (p50, p99) and
fanout's CPU per request for a broadcast route delivering 1 KiB POSTs to one nginx target,
with the memory spool (no `spool:`) and the disk spool under each fsync policy (never,
group, always), one worker each, rounds alternating. Then the disk bytes one event takes:
events accepted for a dead target (so none is delivered) against the spool's size.

Usage: bench/spool.py [--duration S] [--rounds N] [--connections C]
"""
import argparse
import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (the shared helpers: backend, start/stop, wrk)

MODES = {"memory": 19401, "never": 19402, "group": 19403, "always": 19404}
DEAD = 19499


def conf(tmp, mode, target):
    spool = "" if mode == "memory" else f"spool: {{ dir: {tmp}/spool-{mode}, fsync: {mode} }}\n"
    return f"""server:
  threads: 1
  pid_file: {tmp}/fanout-{mode}.pid
  upgrade_sock: {tmp}/fanout-{mode}.sock
  grace_period_seconds: 0
  graceful_shutdown_timeout_seconds: 1
listen: ["127.0.0.1:{MODES[mode]}"]
defaults: {{ access_log: off }}
{spool}upstreams:
  target: {{ backends: ["127.0.0.1:{target}"] }}
routes:
  - match: {{ prefix: / }}
    broadcast: [target]
"""


def bytes_per_event(tmp, duration):
    """Events accepted for a dead target stay in the spool: its size over their number."""
    path = os.path.join(tmp, "dead.yaml")
    with open(path, "w") as f:
        f.write(conf(tmp, "group", DEAD).replace(f"spool-group", "spool-dead"))
    proc = run.start([run.FANOUT, "-c", path], "dead", MODES["group"], tmp)
    try:
        res = run.wrk(MODES["group"], 32, duration, "post1k.lua", tmp)
    finally:
        run.stop([proc])
    size = sum(os.path.getsize(p) for p in glob.glob(f"{tmp}/spool-dead/*.seg"))
    return res["requests"], size


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="fanout-spool-bench-")
    procs = []
    try:
        os.makedirs(os.path.join(tmp, "backend_body"), exist_ok=True)
        with open(os.path.join(tmp, "backend.conf"), "w") as f:
            f.write(run.backend_conf(tmp))
        procs.append(run.start(["nginx", "-c", f"{tmp}/backend.conf"], "backend", run.BACKENDS[0], tmp))
        fanouts = {}
        for mode in MODES:
            path = os.path.join(tmp, f"{mode}.yaml")
            with open(path, "w") as f:
                f.write(conf(tmp, mode, run.BACKENDS[0]))
            fanouts[mode] = run.start([run.FANOUT, "-c", path], mode, MODES[mode], tmp)
        procs += fanouts.values()
        results = {m: [] for m in MODES}
        order = list(MODES)
        for r in range(args.rounds):
            for mode in (order if r % 2 == 0 else order[::-1]):
                res = run.run_wrk(MODES[mode], args.connections, args.duration, "post1k.lua", tmp,
                                  fanouts[mode])
                results[mode].append(res)
                print(f"  round {r + 1} {mode:7} {res['rps']:>9.0f} req/s  p99 {res['p99']:.2f} ms"
                      f"  errors {res['errors']}  CPU {res['cpu_us']:.1f} µs/req", file=sys.stderr)
        run.stop(list(fanouts.values()))
        procs = procs[:1]
        events, size = bytes_per_event(tmp, 3)
        print(f"# bench/spool.py --duration {args.duration} --rounds {args.rounds} "
              f"--connections {args.connections}")
        print("| spool | accepted/s (median) | p50 ms | p99 ms | errors | CPU µs/req | vs memory |")
        print("|---|---|---|---|---|---|---|")
        med = {m: {k: statistics.median(x[k] for x in rs) for k in ["rps", "p50", "p99", "cpu_us"]}
               for m, rs in results.items()}
        for m in MODES:
            print(f"| {m} | {med[m]['rps']:.0f} | {med[m]['p50']:.2f} | {med[m]['p99']:.2f} | "
                  f"{sum(x['errors'] for x in results[m])} | {med[m]['cpu_us']:.1f} | "
                  f"{med[m]['rps'] / med['memory']['rps']:.2f}× |")
        print(f"\nDisk: {events} events of 1 KiB kept for a dead target took {size} bytes: "
              f"{size / max(events, 1):.0f} bytes per event.")
    finally:
        run.stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
