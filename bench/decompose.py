#!/usr/bin/env python3
"""Where a proxied keep-alive request's cost goes, per request, for fanout, plain Pingora
(examples/plain_pingora.rs) and nginx: CPU (user and kernel), system calls (total, and by
name from strace), context switches, wake-ups the proxy causes, and heap allocations
(uprobes on the allocator: mimalloc's entry points in fanout, glibc's malloc family in
plain Pingora and nginx).

The scenario is ka1 of bench/run.py (wrk -t1 -c64 keep-alive GETs, one worker, two nginx
backends answering 3 bytes). Requests are counted at the backends (nginx stub_status), so
every figure is divided by the requests proxied in the same window. Each kind of figure
is taken in a window of its own: strace and uprobes slow the proxy down, which changes
nothing per request but would spoil the CPU figure.

With --sites, it records each allocation of fanout and plain Pingora with its call stack
(perf record on the allocator's uprobes) and prints, per request, the allocations by the
innermost function of a named crate that asked for them (fanout's own code, Pingora's
crates, tokio, http), so that each can be traced to its source.

Needs root (perf, strace). Usage: bench/decompose.py [--window S] [--rounds N] [--sites]
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (the ports, configurations and process helpers of bench/run.py)

STATUS_PORT = 19106
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"


def backend_conf(tmp):
    """run.py's backends, plus stub_status to count the requests that reached them."""
    conf = run.backend_conf(tmp)
    status = (f"  server {{ listen 127.0.0.1:{STATUS_PORT}; access_log off; "
              f"location / {{ stub_status; }} }}\n}}\n")
    return conf.rstrip().removesuffix("}") + status


def backend_requests():
    text = urllib.request.urlopen(f"http://127.0.0.1:{STATUS_PORT}/", timeout=5).read().decode()
    # "server accepts handled requests\n A B C" -- minus the status requests themselves.
    return int(text.splitlines()[2].split()[2])


def worker_pid(name, proc):
    """The process that does the work: nginx's single worker, else the proxy itself."""
    if name != "nginx":
        return proc.pid
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        return int(f.read().split()[0])


def cpu_split(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def windowed(measure, seconds, port, tmp):
    """Runs wrk on `port` past both ends of a window, and `measure(seconds)` inside it;
    returns (what measure returned, requests proxied in the window). A measure that counts
    its own requests (it returns `(value, requests)` in an `Exact`) is taken at its word."""
    wrk = subprocess.Popen(["wrk", "-t1", "-c64", f"-d{seconds + 5}s", f"http://127.0.0.1:{port}/bench"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        before = backend_requests()
        got = measure(seconds)
        after = backend_requests()
    finally:
        wrk.wait(timeout=seconds + 30)
    if isinstance(got, Exact):
        return got.value, got.requests
    return got, after - before - 1


class Exact:
    """What a measure saw, with the requests proxied while it was looking."""
    def __init__(self, value, requests):
        self.value, self.requests = value, requests


def perf_counts(pid, events):
    """Counts `events` in the process over the window. perf takes a while to attach (uprobes
    most of all), so it counts in 100 ms intervals from the start, and only the intervals
    between two readings of the backends' request count, taken once it is attached, count."""
    def measure(seconds):
        perf = subprocess.Popen(["perf", "stat", "-x,", "-I", "100", "-e", ",".join(events), "-p", str(pid)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        started = time.time()
        time.sleep(1.5)
        t0, before = time.time() - started, backend_requests()
        time.sleep(seconds)
        t1, after = time.time() - started, backend_requests()
        time.sleep(0.3)
        perf.send_signal(2)
        _, err = perf.communicate(timeout=30)
        counts, first, last = {}, None, None
        for line in err.splitlines():
            parts = line.split(",")
            if len(parts) < 4 or not parts[1].strip().replace(".", "").isdigit():
                continue
            at = float(parts[0])
            # perf's clock starts a little after ours: an interval ending in (t0, t1] counts.
            if t0 < at <= t1:
                counts[parts[3]] = counts.get(parts[3], 0) + float(parts[1])
                first = at if first is None else min(first, at)
                last = at if last is None else max(last, at)
        if first is None:
            return Exact(counts, 1)
        # Scale the requests to the intervals counted (they cover last - first + 0.1 s).
        covered = (last - first + 0.1) / max(t1 - t0, 1e-3)
        return Exact(counts, max((after - before - 1) * covered, 1))
    return measure


def cpu_measure(pid):
    def measure(seconds):
        u0, s0 = cpu_split(pid)
        time.sleep(seconds)
        u1, s1 = cpu_split(pid)
        return {"user": u1 - u0, "sys": s1 - s0}
    return measure


def strace_measure(pid):
    def measure(seconds):
        out = subprocess.run(["timeout", "-s", "INT", str(seconds), "strace", "-c", "-f", "-p", str(pid)],
                             capture_output=True, text=True)
        calls = {}
        for line in out.stderr.splitlines():
            m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
            if m and m.group(2) != "total":
                calls[m.group(2)] = int(m.group(1))
        return calls
    return measure


def alloc_probes(name):
    """Adds uprobes on the allocator `name` uses; returns their event names."""
    if name == "fanout":
        binary, funcs = run.FANOUT, ["mi_malloc_aligned", "mi_zalloc_aligned", "mi_realloc_aligned"]
    else:
        binary, funcs = LIBC, ["malloc", "calloc", "realloc"]
    events = []
    for f in funcs:
        out = subprocess.run(["perf", "probe", "-q", "-x", binary, "-a", f], capture_output=True, text=True)
        listed = subprocess.run(["perf", "probe", "-l"], capture_output=True, text=True).stdout
        m = re.search(rf"(probe_\w+:{f})\s", listed)
        if not m:
            sys.exit(f"could not probe {f} in {binary}: {out.stderr}")
        events.append(m.group(1))
    return events


# Code an allocation is charged to: the innermost frame of fanout or Pingora, else of one of
# the libraries they call.
OWNERS = (("fanout::", "pingora_"), ("tokio::", "http::", "bytes::", "h2::"))


def owner(frames):
    """The innermost frame (`frames` leaf first) of fanout or Pingora, else of a library
    they use, shortened to its path."""
    names = []
    for f in frames:
        name = f.split(" ", 1)[-1].strip()
        name = re.sub(r"^<(.*?) as .*?>", r"\1", name)
        while re.search(r"<[^<>]*>", name):
            name = re.sub(r"<[^<>]*>", "", name)
        names.append(name.replace("::{{closure}}", "").replace(" (inlined)", "").split("+")[0][:100])
    for prefixes in OWNERS:
        for name in names:
            if name.startswith(prefixes):
                return name
    return "(other)"


def alloc_sites(pid, name, seconds, port, tmp):
    """Allocations per request by the code that asked for them: the total counted by
    uprobes, shared out by the stacks of one allocation in 25 (perf cannot copy a stack for
    every one at this rate; a fixed period keeps the sample unbiased)."""
    events = alloc_probes(name)
    counted, n = windowed(perf_counts(pid, events), seconds, port, tmp)
    total = sum(counted.values()) / max(n, 1)
    data = f"{tmp}/{name}.perf"

    def measure(seconds):
        subprocess.run(["perf", "record", "-q", "-c", "25", "-e", ",".join(events),
                        "--call-graph", "dwarf,8192", "-p", str(pid), "-o", data, "--",
                        "sleep", str(seconds)], capture_output=True)
    windowed(measure, seconds, port, tmp)
    subprocess.run(["perf", "probe", "-q", "-d", "probe_*:*"], capture_output=True)
    script = subprocess.run(["perf", "script", "-i", data, "-F", "ip,sym"], capture_output=True,
                            text=True).stdout
    counts = {}
    for sample in script.split("\n\n"):
        frames = [l.strip() for l in sample.strip().splitlines() if l.strip()]
        if frames:
            o = owner(frames)
            counts[o] = counts.get(o, 0) + 1
    sampled = max(sum(counts.values()), 1)
    print(f"  {name}: {sampled} sampled allocation stacks", file=sys.stderr)
    return total, {k: total * v / sampled for k, v in counts.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sites", action="store_true", help="allocations by call site instead")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="fanout-decompose-")
    procs = []
    subprocess.run(["perf", "probe", "-q", "-d", "probe_*:*"], capture_output=True)
    try:
        proxies = run.start_ka1_trio(tmp, backend_conf(tmp), procs)
        if args.sites:
            print(f"# {time.strftime('%Y-%m-%d')}: bench/decompose.py --sites --window {args.window}")
            for name in ["fanout", "pingora"]:
                total, sites = alloc_sites(worker_pid(name, proxies[name]), name, args.window,
                                           run.PORTS[name], tmp)
                print(f"\n{name}: {total:.1f} allocations per request\n")
                print("| share of allocations | ≈ per request | asked for by |\n|---|---|---|")
                for site, per_req in sorted(sites.items(), key=lambda kv: -kv[1]):
                    if per_req >= 0.5:
                        print(f"| {100 * per_req / total:.1f} % | {per_req:.1f} | `{site}` |")
            return
        rows = {}
        for name, proc in proxies.items():
            pid, port, w = worker_pid(name, proc), run.PORTS[name], args.window
            per = lambda got_n, key: got_n[0].get(key, 0) / max(got_n[1], 1)
            r = {"cpu_user": [], "cpu_sys": [], "syscalls": [], "switches": [], "wakeups": [], "allocs": []}
            for _ in range(args.rounds):
                g = windowed(cpu_measure(pid), w, port, tmp)
                r["cpu_user"].append(per(g, "user") * 1e6)
                r["cpu_sys"].append(per(g, "sys") * 1e6)
                g = windowed(perf_counts(pid, ["raw_syscalls:sys_enter", "context-switches",
                                               "sched:sched_wakeup"]), w, port, tmp)
                r["syscalls"].append(per(g, "raw_syscalls:sys_enter"))
                r["switches"].append(per(g, "context-switches"))
                r["wakeups"].append(per(g, "sched:sched_wakeup"))
            events = alloc_probes(name)
            for _ in range(args.rounds):
                g = windowed(perf_counts(pid, events), w, port, tmp)
                r["allocs"].append(sum(g[0].values()) / max(g[1], 1))
            subprocess.run(["perf", "probe", "-q", "-d", "probe_*:*"], capture_output=True)
            calls, n = windowed(strace_measure(pid), w, port, tmp)
            r["by_call"] = {k: v / max(n, 1) for k, v in calls.items()}
            rows[name] = r
            print(f"  {name}: " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in r.items()
                                            if k != "by_call"), file=sys.stderr)
        print(f"# {time.strftime('%Y-%m-%d')}: bench/decompose.py --window {args.window} --rounds {args.rounds}")
        names = list(rows)
        print("| per proxied request | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for key, label, fmt in [("cpu_user", "CPU, user (µs)", "{:.1f}"), ("cpu_sys", "CPU, kernel (µs)", "{:.1f}"),
                                ("syscalls", "system calls", "{:.2f}"), ("switches", "context switches", "{:.3f}"),
                                ("wakeups", "wake-ups caused", "{:.2f}"), ("allocs", "heap allocations", "{:.1f}")]:
            print(f"| {label} | " + " | ".join(fmt.format(statistics.median(rows[n][key])) for n in names) + " |")
        calls = sorted({c for n in names for c in rows[n]["by_call"]},
                       key=lambda c: -max(rows[n]["by_call"].get(c, 0) for n in names))
        for c in calls:
            if max(rows[n]["by_call"].get(c, 0) for n in names) >= 0.01:
                print(f"| `{c}` (strace) | " + " | ".join(f"{rows[n]['by_call'].get(c, 0):.2f}" for n in names) + " |")
    finally:
        subprocess.run(["perf", "probe", "-q", "-d", "probe_*:*"], capture_output=True)
        run.stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
