#!/usr/bin/env python3
"""A dead backend among two: what it costs once it is taken out (passive ejection, on by
default). Two fanout processes (one worker each) over the nginx backend of bench/run.py:
"two live" balances over two live ports of it, "one dead" over one live port and a port
where nothing listens. wrk -t1 -c64 in alternating rounds, each round's first second left
out (wrk runs 1 s, then the measured run): the paired ratio is the cost after ejection.
The log of the "one dead" process is counted too. `make bench-dead-backend`.

Usage: bench/dead_backend.py [--duration S] [--rounds N]
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402

PORTS = {"two live": 19041, "one dead": 19042}
DEAD = 19049


def conf(tmp, name):
    live = ", ".join(f"127.0.0.1:{p}" for p in run.BACKENDS)
    backends = live if name == "two live" else f"127.0.0.1:{run.BACKENDS[0]}, 127.0.0.1:{DEAD}"
    return run.fanout_server(tmp, name.replace(" ", "-"), 1, PORTS[name]) + f"""defaults: {{ access_log: off }}
upstreams:
  u: {{ backends: [{backends}] }}
routes:
  - {{ match: {{ prefix: / }}, upstream: u }}
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="fanout-bench-dead-")
    procs = []
    try:
        with open(os.path.join(tmp, "backend.conf"), "w") as f:
            f.write(run.backend_conf(tmp))
        os.makedirs(os.path.join(tmp, "backend_body"), exist_ok=True)
        procs.append(run.start(["nginx", "-c", f"{tmp}/backend.conf"], "backend", run.BACKENDS[0], tmp))
        gws = {}
        for name in PORTS:
            path = os.path.join(tmp, f"{name.replace(' ', '-')}.yaml")
            with open(path, "w") as f:
                f.write(conf(tmp, name))
            gws[name] = run.start([run.FANOUT, "-c", path], name.replace(" ", "-"), PORTS[name], tmp)
            procs.append(gws[name])
        results = {n: [] for n in PORTS}
        order = list(PORTS)
        for r in range(args.rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                run.wrk(PORTS[name], 64, 1, None, tmp)  # the first second, left out
                res = run.run_wrk(PORTS[name], 64, args.duration, None, tmp, gws[name])
                results[name].append(res)
                print(f"  round {r + 1} {name:9} {res['rps']:>9.0f} req/s  errors {res['errors']}",
                      file=sys.stderr)
        print(f"# {time.strftime('%Y-%m-%d')}, bench/dead_backend.py --duration {args.duration} "
              f"--rounds {args.rounds} (wrk -t1 -c64, one worker each)")
        print("| backends | req/s (median) | p99 ms | errors | CPU µs/req |")
        print("|---|---|---|---|---|")
        for name in PORTS:
            med = {k: statistics.median(x[k] for x in results[name]) for k in ["rps", "p99", "cpu_us"]}
            errors = sum(x["errors"] for x in results[name])
            print(f"| {name} | {med['rps']:.0f} | {med['p99']:.2f} | {errors} | {med['cpu_us']:.1f} |")
        ratio = statistics.median(b["rps"] / a["rps"] for a, b in zip(results["two live"], results["one dead"]))
        print(f"\none dead / two live, paired by round: {ratio:.3f}× req/s")
        log = open(os.path.join(tmp, "one-dead.stderr")).read().splitlines()
        warned = [l for l in log if " WARN " in l or " ERROR " in l]
        print(f"log of the 'one dead' process over the whole run: {len(log)} lines, "
              f"{len(warned)} of them warnings or errors:")
        for line in warned[:10]:
            print(f"    {line}")
    finally:
        run.stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
