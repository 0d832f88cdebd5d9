#!/usr/bin/env python3
"""What slow, idle and hostile clients cost: fanout and nginx side by side, same run.

1. Memory per connection: opens N connections that dribble a request head (never
   finished) and N keep-alive connections idle after one answered request, and reports the
   server's RSS growth per connection (fanout: its process; nginx: master + worker).
2. slowhttptest in its slow-headers (-H), slow-body (-B) and slow-read (-X) modes against
   each server while wrk measures normal keep-alive clients; reports wrk's req/s, and
   slowhttptest's last closed/connected counts.

Usage: bench/clients.py [--conns 10000] [--fanout PATH [--no-clients-key]] [--slow-seconds 30]
       [--skip-slow]
Every process listens on 127.0.0.1 only.
"""
import argparse
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (the shared configurations of bench/run.py)

PORTS = {"fanout": 19001, "nginx": 19002}


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def nginx_pids(master):
    out = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout
    return [master] + [int(p) for p in out.split()]


def open_conns(port, n, mode):
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        if mode == "slow":
            s.sendall(b"GET /bench HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        else:
            s.sendall(b"GET /bench HTTP/1.1\r\nHost: a\r\n\r\n")
        socks.append(s)
    if mode == "idle":
        for s in socks:
            s.settimeout(10)
            data = s.recv(4096)
            if not data.startswith(b"HTTP/1.1 200"):
                sys.exit(f"idle connection got {data[:40]!r}")
    return socks


def measure(name, port, pids, n, mode):
    time.sleep(1)
    before = rss_kib(pids())
    socks = open_conns(port, n, mode)
    time.sleep(2)
    after = rss_kib(pids())
    for s in socks:
        s.close()
    per = (after - before) * 1024 / n
    print(f"| {name} | {mode} | {n} | {before / 1024:.1f} | {after / 1024:.1f} | {per / 1024:.1f} |",
          flush=True)
    time.sleep(2)
    return per


def slowhttp(port, mode, seconds, tmp):
    flag = {"slow-headers": "-H", "slow-body": "-B", "slow-read": "-X"}[mode]
    extra = ["-k", "3", "-n", "5", "-z", "32", "-w", "10", "-y", "20"] if mode == "slow-read" else []
    prefix = os.path.join(tmp, f"slow-{port}-{mode}")
    cmd = ["slowhttptest", flag, "-c", "4000", "-r", "400", "-i", "10", "-l", str(seconds),
           "-u", f"http://127.0.0.1:{port}/bench", "-t", "POST" if mode == "slow-body" else "GET",
           "-p", "5", "-o", prefix, "-g"] + extra
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), prefix


def last_counts(prefix):
    try:
        lines = open(prefix + ".csv").read().strip().splitlines()
        seconds, closed, pending, connected, service = lines[-1].split(",")[:5]
        return f"{closed} closed, {connected} connected at {seconds} s"
    except (OSError, ValueError):
        return "no report"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", type=int, default=10000)
    ap.add_argument("--fanout", default=run.FANOUT)
    ap.add_argument("--slow-seconds", type=int, default=30)
    ap.add_argument("--skip-slow", action="store_true")
    ap.add_argument("--no-clients-key", action="store_true",
                    help="leave `clients:` out of fanout's configuration (for builds before it)")
    args = ap.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.conns + 1000:
        sys.exit(f"need {args.conns + 1000} file descriptors, the limit is {hard}")
    tmp = tempfile.mkdtemp(prefix="fanout-clients-")
    procs = []
    try:
        with open(f"{tmp}/backend.conf", "w") as f:
            f.write(run.backend_conf(tmp))
        procs.append(run.start(["nginx", "-c", f"{tmp}/backend.conf"], "backend", run.BACKENDS[0], tmp))
        nginx = run.nginx_conf(tmp, 1, False, None).replace(
            "worker_connections 8192;", "worker_connections 30000;").replace(
            "keepalive_requests 1000000;\n  upstream",
            "keepalive_requests 1000000;\n  client_header_timeout 60s;\n  keepalive_timeout 75s;\n  upstream", 1)
        with open(f"{tmp}/nginx.conf", "w") as f:
            f.write(nginx.replace("worker_processes 1;", "worker_processes 1;\nworker_rlimit_nofile 20000;"))
        conf = run.fanout_conf(tmp, 1, False, None)
        if not args.no_clients_key:
            conf += "clients: { header_timeout: 60s, keepalive_timeout: 75s }\n"
        with open(f"{tmp}/fanout.yaml", "w") as f:
            f.write(conf)

        def servers():
            """Fresh processes, so that one measurement's memory never hides in the next."""
            ng = run.start(["nginx", "-c", f"{tmp}/nginx.conf"], "nginx", PORTS["nginx"], tmp)
            fo = run.start([args.fanout, "-c", f"{tmp}/fanout.yaml"], "fanout", PORTS["fanout"], tmp)
            return ng, fo

        print(f"fanout: {args.fanout}\n")
        print("| server | connections | count | RSS before (MiB) | RSS after (MiB) | KiB per connection |")
        print("|---|---|---|---|---|---|")
        for mode in ["slow", "idle"]:
            ng, fo = servers()
            measure("fanout", PORTS["fanout"], lambda: [fo.pid], args.conns, mode)
            measure("nginx", PORTS["nginx"], lambda: nginx_pids(ng.pid), args.conns, mode)
            run.stop([ng, fo])
        ng, fo = servers()
        procs += [ng, fo]
        if args.skip_slow:
            return
        print("\n| server | attack (slowhttptest, 4000 connections) | wrk req/s meanwhile | slowhttptest at the end |")
        print("|---|---|---|---|")
        for mode in ["slow-headers", "slow-body", "slow-read"]:
            for name in ["fanout", "nginx"]:
                port = PORTS[name]
                attack, prefix = slowhttp(port, mode, args.slow_seconds, tmp)
                time.sleep(5)
                wrk = run.run_wrk(port, 64, max(5, args.slow_seconds - 15), None, tmp)
                attack.wait(timeout=args.slow_seconds + 60)
                print(f"| {name} | {mode} | {wrk['rps']:.0f} (errors {wrk['errors']}) | "
                      f"{last_counts(prefix)} |", flush=True)
    finally:
        run.stop(procs)


if __name__ == "__main__":
    main()
