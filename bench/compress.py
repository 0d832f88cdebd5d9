#!/usr/bin/env python3
"""Response compression: bytes on the wire and requests/s for a 20 KiB JSON answer with
gzip, br and zstd, fanout against nginx `gzip on` (level 1, its default, and level 6) in
the same run, with the CPU each spends per request; and the cost for a route without
`compress` (must be none). `make bench-compress`.

One nginx backend serves the JSON document (and nothing is cached). fanout (one worker)
has /plain (no `compress`) and /z (compress: zstd, br, gzip); nginx (one worker) proxies
/plain, /g1 (gzip level 1) and /g6 (gzip level 6). wrk sends `Accept-Encoding` for the
coding measured. Rounds alternate the order; medians are reported; bytes per answer are
measured with one curl per case. With FANOUT_BASE=<binary of the build before compression
existed>, the base and this build run the same one-route configuration (no `compress`),
each in a process of its own, in the same rounds: their paired ratio is the cost a route
without `compress` pays.

Usage: bench/compress.py [--duration S] [--rounds N]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402

FANOUT_PORT, NGINX_PORT, BASE_PORT, ORIGIN_PORT, ALONE_PORT = 19031, 19032, 19033, 19034, 19035
BASE = os.environ.get("FANOUT_BASE")


def document():
    items = ",".join(f'{{"id":{i},"name":"item {i}","tags":["a","b"],"price":{i}.5}}' for i in range(200))
    doc = f'{{"items":[{items}]}}'
    return doc + " " * max(0, 20 * 1024 - len(doc))


def origin_conf(tmp):
    return run.nginx_head(tmp, "origin") + f"""http {{
  access_log off;
  keepalive_requests 1000000;
  types {{ application/json json; }}
  server {{
    listen 127.0.0.1:{ORIGIN_PORT};
    location / {{ root {tmp}/www; try_files /doc.json =404; default_type application/json; }}
  }}
}}
"""


def fanout_conf(tmp, name, port):
    return run.fanout_server(tmp, name, 1, port) + f"""defaults: {{ access_log: off }}
upstreams:
  origin: {{ backends: [127.0.0.1:{ORIGIN_PORT}] }}
routes:
  - {{ name: plain, match: {{ prefix: /plain }}, upstream: origin }}
  - name: z
    match: {{ prefix: /z }}
    upstream: origin
    compress: {{ algorithms: [zstd, br, gzip] }}
"""


def base_conf(tmp, name="base", port=BASE_PORT):
    return run.fanout_server(tmp, name, 1, port) + f"""defaults: {{ access_log: off }}
upstreams:
  origin: {{ backends: [127.0.0.1:{ORIGIN_PORT}] }}
routes:
  - {{ name: plain, match: {{ prefix: /plain }}, upstream: origin }}
"""


def nginx_conf(tmp):
    proxy = f'proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection "";'
    return run.nginx_head(tmp, "nginx") + f"""http {{
  access_log off;
  keepalive_requests 1000000;
  upstream origin {{ server 127.0.0.1:{ORIGIN_PORT}; keepalive 64; }}
  gzip_types application/json;
  gzip_min_length 1024;
  gzip_proxied any;
  server {{
    listen 127.0.0.1:{NGINX_PORT};
    location /plain {{ {proxy} }}
    location /g1 {{ gzip on; gzip_comp_level 1; {proxy} }}
    location /g6 {{ gzip on; gzip_comp_level 6; {proxy} }}
  }}
}}
"""


def script(tmp, name, path, ae):
    lua = os.path.join(tmp, f"{name}.lua")
    with open(lua, "w") as f:
        f.write(f'wrk.path = "{path}"\n')
        if ae:
            f.write(f'wrk.headers["Accept-Encoding"] = "{ae}"\n')
    return lua


def wire_bytes(port, path, ae):
    """The body bytes of one answer, and its Content-Encoding."""
    cmd = ["curl", "-s", "-o", "/dev/null", "-w", "%{size_download} %{content_type}",
           "-D", "-", f"http://127.0.0.1:{port}{path}"]
    if ae:
        cmd[1:1] = ["-H", f"Accept-Encoding: {ae}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    encoding = next((l.split(":", 1)[1].strip() for l in out.splitlines()
                     if l.lower().startswith("content-encoding:")), "identity")
    return int(out.strip().splitlines()[-1].split()[0]), encoding


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="fanout-bench-compress-")
    os.chmod(tmp, 0o755)
    procs = []
    try:
        os.makedirs(f"{tmp}/www")
        os.chmod(f"{tmp}/www", 0o755)
        with open(f"{tmp}/www/doc.json", "w") as f:
            f.write(document())
        os.chmod(f"{tmp}/www/doc.json", 0o644)
        for name, text in [("origin", origin_conf(tmp)), ("nginx", nginx_conf(tmp))]:
            with open(f"{tmp}/{name}.conf", "w") as f:
                f.write(text)
        procs.append(run.start(["nginx", "-c", f"{tmp}/origin.conf"], "origin", ORIGIN_PORT, tmp))
        with open(f"{tmp}/fanout.yaml", "w") as f:
            f.write(fanout_conf(tmp, "fanout", FANOUT_PORT))
        fanout = run.start([run.FANOUT, "-c", f"{tmp}/fanout.yaml"], "fanout", FANOUT_PORT, tmp)
        nginx = run.start(["nginx", "-c", f"{tmp}/nginx.conf"], "nginx", NGINX_PORT, tmp)
        procs += [fanout, nginx]
        cases = {
            "fanout, no compress": (FANOUT_PORT, fanout, "/plain", "gzip, br, zstd"),
            "fanout gzip": (FANOUT_PORT, fanout, "/z", "gzip"),
            "fanout br": (FANOUT_PORT, fanout, "/z", "br"),
            "fanout zstd": (FANOUT_PORT, fanout, "/z", "zstd"),
            "nginx, no gzip": (NGINX_PORT, nginx, "/plain", "gzip"),
            "nginx gzip level 1": (NGINX_PORT, nginx, "/g1", "gzip"),
            "nginx gzip level 6": (NGINX_PORT, nginx, "/g6", "gzip"),
        }
        if BASE:
            with open(f"{tmp}/base.yaml", "w") as f:
                f.write(base_conf(tmp))
            base = run.start([BASE, "-c", f"{tmp}/base.yaml"], "base", BASE_PORT, tmp)
            # This build with the base's very configuration, in a process of its own.
            with open(f"{tmp}/alone.yaml", "w") as f:
                f.write(base_conf(tmp, "alone", ALONE_PORT))
            alone = run.start([run.FANOUT, "-c", f"{tmp}/alone.yaml"], "alone", ALONE_PORT, tmp)
            procs += [base, alone]
            cases["fanout before compress existed"] = (BASE_PORT, base, "/plain", "gzip, br, zstd")
            cases["this build, same configuration"] = (ALONE_PORT, alone, "/plain", "gzip, br, zstd")
        sizes = {n: wire_bytes(c[0], c[2], c[3]) for n, c in cases.items()}
        results = {n: [] for n in cases}
        order = list(cases)
        for r in range(args.rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                port, proc, path, ae = cases[name]
                lua = script(tmp, name.replace(" ", "-").replace(",", ""), path, ae)
                res = run.run_wrk(port, 64, args.duration, lua, tmp, proc)
                if res["errors"]:
                    sys.exit(f"{name}: {res['errors']} errors")
                results[name].append(res)
                print(f"  round {r + 1} {name:32} {res['rps']:>9.0f} req/s  p99 {res['p99']:.2f} ms  "
                      f"CPU {res['cpu_us']:.1f} µs/req", file=sys.stderr)
        print(f"# {time.strftime('%Y-%m-%d')}, bench/compress.py --duration {args.duration} "
              f"--rounds {args.rounds} (wrk -t1 -c64, one worker each, 20 KiB JSON)")
        print("| case | Content-Encoding | body bytes | req/s (median) | p99 ms | CPU µs/req |")
        print("|---|---|---|---|---|---|")
        for name in cases:
            med = {k: statistics.median(x[k] for x in results[name]) for k in ["rps", "p99", "cpu_us"]}
            size, enc = sizes[name]
            print(f"| {name} | {enc} | {size} | {med['rps']:.0f} | {med['p99']:.2f} | {med['cpu_us']:.1f} |")
        if BASE:
            pairs = [b["rps"] / a["rps"] for a, b in
                     zip(results["fanout before compress existed"], results["this build, same configuration"])]
            cpu = [b["cpu_us"] / a["cpu_us"] for a, b in
                   zip(results["fanout before compress existed"], results["this build, same configuration"])]
            print(f"\nroute without compress, this build / the build before compression, paired: "
                  f"{statistics.median(pairs):.3f}× req/s, {statistics.median(cpu):.3f}× CPU per request")
    finally:
        run.stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
