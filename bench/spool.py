#!/usr/bin/env python3
"""The broadcast spool's cost: accepted requests per second, the 202's latency (p50, p99) and
fanout's CPU per request for a broadcast route delivering 1 KiB POSTs to one nginx target,
with the memory spool (no `spool:`), the disk spool under each fsync policy (never,
group, always) and the Redis spool (`store: redis`, one local redis-server with AOF
`appendfsync everysec`), one worker each, rounds alternating; then the Redis commands one
event costs (from `INFO commandstats`: round trips, and the commands the scripts run). Then the disk bytes one event takes:
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

MODES = {"memory": 19401, "never": 19402, "group": 19403, "always": 19404, "redis": 19405}
DEAD = 19499
REDIS_PORT = 19406
# Commands fanout sends itself (round trips); the rest run inside its scripts.
TOP_LEVEL = {"evalsha", "eval", "xreadgroup", "xautoclaim", "xinfo", "config", "xgroup", "script"}


def conf(tmp, mode, target):
    if mode == "memory":
        spool = ""
    elif mode == "redis":
        spool = (f"redis: {{ url: redis://127.0.0.1:{REDIS_PORT}, timeout: 250ms }}\n"
                 "spool: { store: redis }\n")
    else:
        spool = f"spool: {{ dir: {tmp}/spool-{mode}, fsync: {mode} }}\n"
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


def commandstats():
    out = subprocess.run(["redis-cli", "-p", str(REDIS_PORT), "INFO", "commandstats"],
                         capture_output=True, text=True, check=True).stdout
    calls = {}
    for line in out.splitlines():
        if line.startswith("cmdstat_"):
            name, rest = line[len("cmdstat_"):].split(":", 1)
            calls[name] = int(rest.split("calls=")[1].split(",")[0])
    return calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="fanout-spool-bench-")
    procs = []
    try:
        redis = subprocess.Popen(["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1",
                                  "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
                                  "--dir", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(redis)
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
        redis_ops = []
        order = list(MODES)
        for r in range(args.rounds):
            for mode in (order if r % 2 == 0 else order[::-1]):
                before = commandstats() if mode == "redis" else None
                res = run.run_wrk(MODES[mode], args.connections, args.duration, "post1k.lua", tmp,
                                  fanouts[mode])
                results[mode].append(res)
                if before is not None:
                    # Deliveries trail the 202s by a moment: let them finish before counting.
                    import time
                    time.sleep(2)
                    after = commandstats()
                    delta = {k: v - before.get(k, 0) for k, v in after.items()}
                    redis_ops.append((res["requests"], delta))
                print(f"  round {r + 1} {mode:7} {res['rps']:>9.0f} req/s  p99 {res['p99']:.2f} ms"
                      f"  errors {res['errors']}  CPU {res['cpu_us']:.1f} µs/req", file=sys.stderr)
        run.stop(list(fanouts.values()))
        procs = procs[:2]
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
        events_r = sum(n for n, _ in redis_ops)
        total = {}
        for _, d in redis_ops:
            for k, v in d.items():
                total[k] = total.get(k, 0) + v
        top = sum(v for k, v in total.items() if k in TOP_LEVEL)
        inner = sum(v for k, v in total.items() if k not in TOP_LEVEL and k != "info")
        detail = ", ".join(f"{k} {v / max(events_r, 1):.2f}" for k, v in sorted(total.items())
                           if k != "info" and v > 0)
        print(f"\nRedis spool: {top / max(events_r, 1):.2f} round trips and {inner / max(events_r, 1):.2f} "
              f"commands inside scripts per event accepted and delivered ({detail}).")
        print(f"\nDisk: {events} events of 1 KiB kept for a dead target took {size} bytes: "
              f"{size / max(events, 1):.0f} bytes per event.")
    finally:
        run.stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
