#!/usr/bin/env python3
"""Cache hits: fanout's response cache against nginx `proxy_cache` (its cache files on tmpfs,
/dev/shm) and, when installed, Varnish (malloc storage), one worker each, rounds alternating,
wrk over keep-alive connections on one cached key: a 1 KiB and a 1 MiB object, served by an
nginx origin with `Cache-Control: max-age=3600`. Then a stampede: 200 concurrent requests
for each of 5 cold keys on a 200 ms origin, counting the requests the origin got.

Usage: bench/cache.py [--duration S] [--rounds N]
"""
import argparse
import concurrent.futures
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (the shared helpers: start/stop, wrk)

PORTS = {"fanout": 19501, "nginx": 19502, "varnish": 19503}
ORIGIN = 19510
SLOW_ORIGIN = 19511


def origin_conf(tmp):
    www = os.path.join(tmp, "www")
    os.makedirs(www, exist_ok=True)
    with open(os.path.join(www, "small"), "wb") as f:
        f.write(b"s" * 1024)
    with open(os.path.join(www, "large"), "wb") as f:
        f.write(b"l" * (1024 * 1024))
    return run.nginx_head(tmp, "origin") + f"""http {{
  access_log {tmp}/origin_access.log;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{ORIGIN};
    root {www};
    location / {{ expires 1h; }}
  }}
}}
"""


def nginx_conf(tmp, cache_dir):
    return run.nginx_head(tmp, "nginx") + f"""http {{
  access_log off;
  keepalive_requests 1000000;
  proxy_cache_path {cache_dir} levels=1:2 keys_zone=c:64m max_size=512m inactive=1h use_temp_path=off;
  upstream origin {{ server 127.0.0.1:{ORIGIN}; keepalive 64; }}
  upstream slow {{ server 127.0.0.1:{SLOW_ORIGIN}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{PORTS['nginx']};
    proxy_cache c;
    proxy_cache_lock on;
    proxy_cache_lock_timeout 5s;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    location /cold/ {{ proxy_pass http://slow; }}
    location / {{ proxy_pass http://origin; }}
  }}
}}
"""


def fanout_conf(tmp):
    return f"""server:
  threads: 1
  pid_file: {tmp}/fanout.pid
  upgrade_sock: {tmp}/fanout.sock
  grace_period_seconds: 0
  graceful_shutdown_timeout_seconds: 1
listen: ["127.0.0.1:{PORTS['fanout']}"]
defaults: {{ access_log: off }}
cache: {{ max_size: 512MiB }}
upstreams:
  origin: {{ backends: ["127.0.0.1:{ORIGIN}"] }}
  slow: {{ backends: ["127.0.0.1:{SLOW_ORIGIN}"] }}
routes:
  - match: {{ prefix: /cold/ }}
    upstream: slow
    cache: {{ ttl: 1h }}
  - match: {{ prefix: / }}
    upstream: origin
    cache: {{ max_object_size: 2MiB }}
"""


def varnish_vcl(tmp):
    path = os.path.join(tmp, "default.vcl")
    with open(path, "w") as f:
        f.write(f"""vcl 4.1;
backend origin {{ .host = "127.0.0.1"; .port = "{ORIGIN}"; }}
backend slow {{ .host = "127.0.0.1"; .port = "{SLOW_ORIGIN}"; }}
sub vcl_recv {{ if (req.url ~ "^/cold/") {{ set req.backend_hint = slow; }} else {{ set req.backend_hint = origin; }} }}
""")
    return path


SLOW_SERVER = """
import http.server, socketserver, sys, time, threading
count = {}
lock = threading.Lock()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        with lock:
            count[self.path] = count.get(self.path, 0) + 1
        if self.path == "/counts":
            body = repr(count).encode()
        else:
            time.sleep(0.2)
            body = b"cold"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.send_header("cache-control", "max-age=3600")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
S(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def stampede(port, key):
    """200 concurrent GETs for one cold key; all must answer 200."""
    def one(_):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", key)
        r = c.getresponse()
        r.read()
        c.close()
        return r.status
    with concurrent.futures.ThreadPoolExecutor(200) as pool:
        statuses = list(pool.map(one, range(200)))
    return sum(1 for s in statuses if s != 200)


def origin_counts():
    c = http.client.HTTPConnection("127.0.0.1", SLOW_ORIGIN, timeout=5)
    c.request("GET", "/counts")
    return eval(c.getresponse().read().decode())  # our own server's repr of a dict


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="fanout-cache-bench-")
    os.chmod(tmp, 0o755)  # Varnish's child runs as its own user and works in here
    cache_dir = tempfile.mkdtemp(prefix="fanout-nginx-cache-", dir="/dev/shm")
    os.chmod(cache_dir, 0o777)  # nginx's workers write here as their own user
    procs = []
    try:
        with open(os.path.join(tmp, "origin.conf"), "w") as f:
            f.write(origin_conf(tmp))
        with open(os.path.join(tmp, "nginx.conf"), "w") as f:
            f.write(nginx_conf(tmp, cache_dir))
        with open(os.path.join(tmp, "fanout.yaml"), "w") as f:
            f.write(fanout_conf(tmp))
        with open(os.path.join(tmp, "slow.py"), "w") as f:
            f.write(SLOW_SERVER)
        procs.append(run.start(["nginx", "-c", f"{tmp}/origin.conf"], "origin", ORIGIN, tmp))
        procs.append(run.start([sys.executable, f"{tmp}/slow.py", str(SLOW_ORIGIN)], "slow", SLOW_ORIGIN, tmp))
        proxies = {}
        commands = {"fanout": [run.FANOUT, "-c", f"{tmp}/fanout.yaml"],
                    "nginx": ["nginx", "-c", f"{tmp}/nginx.conf"]}
        if shutil.which("varnishd"):
            commands["varnish"] = [
                "varnishd", "-F", "-a", f"127.0.0.1:{PORTS['varnish']}", "-f", varnish_vcl(tmp),
                "-s", "malloc,512m", "-n", os.path.join(tmp, "varnish"), "-p", "thread_pools=1"]
        for name, cmd in commands.items():
            proxies[name] = run.start(cmd, name, PORTS[name], tmp)
            procs.append(proxies[name])
        targets = list(proxies)
        print(f"# bench/cache.py --duration {args.duration} --rounds {args.rounds}")
        print("| object | cache | hits/s (median) | p50 ms | p99 ms | errors | CPU µs/req | vs nginx | vs Varnish |")
        print("|---|---|---|---|---|---|---|---|---|")
        for obj, conns in [("small", 64), ("large", 16)]:
            script = os.path.join(tmp, f"{obj}.lua")
            with open(script, "w") as f:
                f.write(f'wrk.path = "/{obj}"\n')
            results = {t: [] for t in targets}
            for r in range(args.rounds):
                for t in (targets if r % 2 == 0 else targets[::-1]):
                    res = run.run_wrk(PORTS[t], conns, args.duration, script, tmp, proxies[t])
                    results[t].append(res)
                    print(f"  {obj} round {r + 1} {t:8} {res['rps']:>9.0f} req/s p99 {res['p99']:.2f} ms"
                          f" errors {res['errors']} CPU {res['cpu_us']:.1f} µs/req", file=sys.stderr)
            med = {t: {k: statistics.median(x[k] for x in rs) for k in ["rps", "p50", "p99", "cpu_us"]}
                   for t, rs in results.items()}
            for t in targets:
                ratio = lambda o: f"{med[t]['rps'] / med[o]['rps']:.2f}×" if t == "fanout" and o in med else ""
                print(f"| {obj if t == 'fanout' else ''} | {t} | {med[t]['rps']:.0f} | {med[t]['p50']:.2f} | "
                      f"{med[t]['p99']:.2f} | {sum(x['errors'] for x in results[t])} | {med[t]['cpu_us']:.1f} | "
                      f"{ratio('nginx')} | {ratio('varnish')} |", flush=True)
        print("\n| cache | cold keys | concurrent requests each | origin requests | failed |")
        print("|---|---|---|---|---|")
        for t in targets:
            failed = 0
            for k in range(5):
                failed += stampede(PORTS[t], f"/cold/{t}-{k}")
            counts = origin_counts()
            got = sum(v for key, v in counts.items() if key.startswith(f"/cold/{t}-"))
            print(f"| {t} | 5 | 200 | {got} | {failed} |", flush=True)
    finally:
        run.stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
