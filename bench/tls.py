#!/usr/bin/env python3
"""TLS and HTTP/2 against nginx and HAProxy, one worker each, same certificate (ECDSA P-256,
made here with openssl), same nginx backend, alternating rounds:

- handshakes: wrk with `Connection: close` over HTTPS, so every request is a new TLS
  connection and a full handshake (wrk does not resume sessions);
- https-ka: keep-alive HTTPS requests (wrk, 64 connections);
- h2: h2load, 4 connections x 100 concurrent streams, HTTP/2 over TLS (nginx `listen ... ssl http2`,
  HAProxy `alpn h2`);
- https-backend: plain clients, the proxy speaks TLS to an HTTPS nginx backend
  (fanout `tls:` vs nginx `proxy_pass https://`, keep-alive to the backend both).

With --candidates, the TLS libraries Pingora offers are measured on equal terms instead:
bench/tlslib (a Pingora HTTPS listener that answers itself, one worker) built with the
`rustls` and with the `openssl` feature, beside nginx answering itself (`return 200`), on
handshakes and keep-alive HTTPS. (`boringssl` needs Go and a BoringSSL build; `s2n` needs
s2n-tls: neither is packaged by Debian.)

Usage: bench/tls.py [--duration S] [--rounds N] [--scenarios handshakes,https-ka,h2,https-backend]
       bench/tls.py --candidates [--duration S] [--rounds N]
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import shutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (the shared helpers: backend, start/stop, wrk)

PORTS = {"fanout": 19301, "nginx": 19302, "haproxy": 19303}
TLS_BACKEND = 19311


def make_cert(tmp):
    key, crt = f"{tmp}/key.pem", f"{tmp}/cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", key, "-out", crt, "-days", "30", "-subj", "/CN=bench.test",
                    "-addext", "subjectAltName=DNS:bench.test,IP:127.0.0.1"],
                   check=True, capture_output=True)
    with open(f"{tmp}/combined.pem", "w") as f:
        f.write(open(crt).read() + open(key).read())
    return crt, key


def nginx_conf(tmp, crt, key, upstream_tls):
    proxy = ("proxy_pass https://tlsbe; proxy_ssl_verify off; proxy_ssl_session_reuse on;"
             if upstream_tls else "proxy_pass http://be;")
    listen = (f"listen 127.0.0.1:{PORTS['nginx']};" if upstream_tls else
              f"listen 127.0.0.1:{PORTS['nginx']} ssl http2; ssl_certificate {crt}; ssl_certificate_key {key};"
              " ssl_session_cache off; ssl_session_tickets off;")
    servers = "\n".join(f"    server 127.0.0.1:{p};" for p in run.BACKENDS)
    return run.nginx_head(tmp, "nginx") + f"""http {{
  access_log off;
  keepalive_requests 1000000;
  upstream be {{
{servers}
    keepalive 256;
  }}
  upstream tlsbe {{
    server 127.0.0.1:{TLS_BACKEND};
    keepalive 256;
  }}
  server {{
    {listen}
    location / {{ {proxy} proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
"""


def tls_backend_conf(tmp, crt, key):
    return run.nginx_head(tmp, "tlsbe") + f"""http {{
  access_log off;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{TLS_BACKEND} ssl;
    ssl_certificate {crt}; ssl_certificate_key {key};
    location / {{ return 200 "ok\\n"; }}
  }}
}}
"""


def haproxy_conf(tmp):
    servers = "\n".join(f"  server s{i} 127.0.0.1:{p}" for i, p in enumerate(run.BACKENDS))
    return f"""global
  nbthread 1
  maxconn 8000
  tune.ssl.cachesize 0
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:{PORTS['haproxy']} ssl crt {tmp}/combined.pem alpn h2,http/1.1 no-tls-tickets
  default_backend be
backend be
  balance roundrobin
{servers}
"""


def fanout_conf(tmp, crt, key, upstream_tls):
    if upstream_tls:
        listen = f'["127.0.0.1:{PORTS["fanout"]}"]'
        upstream = f"backends: [127.0.0.1:{TLS_BACKEND}]\n    tls: {{ verify: false }}"
    else:
        listen = (f'[{{ address: "127.0.0.1:{PORTS["fanout"]}", '
                  f'tls: {{ certificates: [{{ cert: {crt}, key: {key} }}] }} }}]')
        upstream = "backends: [" + ", ".join(f"127.0.0.1:{p}" for p in run.BACKENDS) + "]"
    return f"""server:
  threads: 1
  upstream_keepalive_pool_size: 1024
  pid_file: {tmp}/fanout.pid
  upgrade_sock: {tmp}/fanout.sock
  grace_period_seconds: 0
  graceful_shutdown_timeout_seconds: 1
listen: {listen}
defaults: {{ access_log: off }}
upstreams:
  be:
    {upstream}
routes:
  - match: {{ prefix: / }}
    upstream: be
"""


def h2load(port, duration):
    out = subprocess.run(["h2load", "-c", "4", "-m", "100", "-t", "1", "-D", str(duration),
                          f"https://127.0.0.1:{port}/bench"], capture_output=True, text=True,
                         timeout=duration + 60)
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out.stdout)
    ok = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored", out.stdout)
    proto = re.search(r"Application protocol: (\S+)", out.stdout)
    if not m or not ok:
        sys.exit(f"h2load gave no result:\n{out.stdout}\n{out.stderr}")
    if not proto or proto.group(1) != "h2":
        sys.exit(f"h2load did not negotiate h2 on {port}:\n{out.stdout}")
    return {"rps": float(m.group(1)), "errors": int(ok.group(2)) + int(ok.group(3))}


def scenario(name, duration, rounds, tmp, crt, key):
    upstream_tls = name == "https-backend"
    targets = ["fanout", "nginx"] if upstream_tls else ["fanout", "nginx", "haproxy"]
    for d in ["backend_body"]:
        os.makedirs(os.path.join(tmp, d), exist_ok=True)
    files = {"backend.conf": run.backend_conf(tmp), "nginx.conf": nginx_conf(tmp, crt, key, upstream_tls),
             "haproxy.cfg": haproxy_conf(tmp), "fanout.yaml": fanout_conf(tmp, crt, key, upstream_tls),
             "tlsbe.conf": tls_backend_conf(tmp, crt, key)}
    for fname, text in files.items():
        with open(os.path.join(tmp, fname), "w") as f:
            f.write(text)
    procs = []
    try:
        procs.append(run.start(["nginx", "-c", f"{tmp}/backend.conf"], "backend", run.BACKENDS[0], tmp))
        if upstream_tls:
            procs.append(run.start(["nginx", "-c", f"{tmp}/tlsbe.conf"], "tlsbe", TLS_BACKEND, tmp))
        proxies = {"nginx": run.start(["nginx", "-c", f"{tmp}/nginx.conf"], "nginx", PORTS["nginx"], tmp),
                   "fanout": run.start([run.FANOUT, "-c", f"{tmp}/fanout.yaml"], "fanout", PORTS["fanout"], tmp)}
        if "haproxy" in targets:
            proxies["haproxy"] = run.start(["haproxy", "-f", f"{tmp}/haproxy.cfg"], "haproxy", PORTS["haproxy"], tmp)
        procs += proxies.values()
        results = {t: [] for t in targets}
        script = os.path.join(tmp, "close.lua")
        with open(script, "w") as f:
            f.write('wrk.headers["Connection"] = "close"\n')
        for r in range(rounds):
            for t in (targets if r % 2 == 0 else targets[::-1]):
                scheme = "http" if upstream_tls else "https"
                cpu = run.cpu_seconds(proxies[t].pid)
                if name == "h2":
                    res = h2load(PORTS[t], duration)
                    res["requests"] = res["rps"] * duration
                else:
                    res = wrk(scheme, PORTS[t], 16 if name == "handshakes" else 64, duration,
                              script if name == "handshakes" else None, tmp)
                res["cpu_us"] = (run.cpu_seconds(proxies[t].pid) - cpu) * 1e6 / max(res["requests"], 1)
                results[t].append(res)
                print(f"  {name} round {r + 1} {t:8} {res['rps']:>10.0f} req/s  errors {res['errors']}"
                      f"  CPU {res['cpu_us']:.1f} µs/req", file=sys.stderr)
        return results
    finally:
        run.stop(procs)


def wrk(scheme, port, conns, duration, script, tmp):
    report = open(os.path.join(run.BENCH, "report.lua")).read()
    body = open(script).read() if script else ""
    path = os.path.join(tmp, "wrk.lua")
    with open(path, "w") as f:
        f.write(body + "\n" + report)
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "-s", path,
                          f"{scheme}://127.0.0.1:{port}/bench"], capture_output=True, text=True,
                         timeout=duration + 60)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT")), None)
    if not line:
        sys.exit(f"wrk gave no result:\n{out.stdout}\n{out.stderr}")
    fields = dict(kv.split("=") for kv in line.split()[1:])
    non2xx = sum(int(l.split(":")[1]) for l in out.stdout.splitlines() if "Non-2xx" in l)
    return {"rps": float(fields["rps"]), "errors": int(fields["errors"]) + non2xx,
            "requests": int(fields["requests"])}


CANDIDATE_PORTS = {"pingora-rustls": 19321, "pingora-openssl": 19322, "nginx": 19323}


def build_candidates(tmp):
    """bench/tlslib built with each TLS feature; the binaries copied to tmp."""
    manifest = os.path.join(run.BENCH, "tlslib", "Cargo.toml")
    bins = {}
    for feature in ["rustls", "openssl"]:
        subprocess.run(["cargo", "build", "--release", "--locked", "--manifest-path", manifest,
                        "--features", feature], check=True)
        built = os.path.join(run.BENCH, "tlslib", "target", "release", "tlslib-bench")
        bins[f"pingora-{feature}"] = shutil.copy(built, os.path.join(tmp, f"tlslib-{feature}"))
    return bins


def candidates(duration, rounds, tmp, crt, key):
    bins = build_candidates(tmp)
    with open(os.path.join(tmp, "direct.conf"), "w") as f:
        f.write(run.nginx_head(tmp, "direct") + f"""http {{
  access_log off;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{CANDIDATE_PORTS['nginx']} ssl; ssl_certificate {crt}; ssl_certificate_key {key};
    ssl_session_cache off; ssl_session_tickets off;
    location / {{ return 200 "ok\\n"; }}
  }}
}}
""")
    procs = {}
    try:
        for name, path in bins.items():
            procs[name] = run.start([path, f"127.0.0.1:{CANDIDATE_PORTS[name]}", crt, key],
                                    name, CANDIDATE_PORTS[name], tmp)
        procs["nginx"] = run.start(["nginx", "-c", f"{tmp}/direct.conf"], "direct",
                                   CANDIDATE_PORTS["nginx"], tmp)
        script = os.path.join(tmp, "close.lua")
        with open(script, "w") as f:
            f.write('wrk.headers["Connection"] = "close"\n')
        targets = list(CANDIDATE_PORTS)
        out = {}
        for name in ["handshakes", "https-ka"]:
            results = {t: [] for t in targets}
            for r in range(rounds):
                for t in (targets if r % 2 == 0 else targets[::-1]):
                    cpu = run.cpu_seconds(procs[t].pid)
                    res = wrk("https", CANDIDATE_PORTS[t], 16 if name == "handshakes" else 64,
                              duration, script if name == "handshakes" else None, tmp)
                    res["cpu_us"] = (run.cpu_seconds(procs[t].pid) - cpu) * 1e6 / max(res["requests"], 1)
                    results[t].append(res)
                    print(f"  {name} round {r + 1} {t:16} {res['rps']:>10.0f} req/s  errors {res['errors']}"
                          f"  CPU {res['cpu_us']:.1f} µs/req", file=sys.stderr)
            out[name] = results
        return out
    finally:
        run.stop(list(procs.values()))


def print_candidates(out):
    print("| scenario | server | req/s (median) | errors | CPU µs/req | vs pingora-openssl | vs nginx |")
    print("|---|---|---|---|---|---|---|")
    for name, results in out.items():
        med = {t: {k: statistics.median(r[k] for r in rs) for k in ["rps", "cpu_us"]}
               for t, rs in results.items()}
        for i, t in enumerate(results):
            ratio = lambda o: f"{med[t]['rps'] / med[o]['rps']:.2f}×" if t != o else ""
            print(f"| {name if i == 0 else ''} | {t} | {med[t]['rps']:.0f} | "
                  f"{sum(r['errors'] for r in results[t])} | {med[t]['cpu_us']:.1f} | "
                  f"{ratio('pingora-openssl')} | {ratio('nginx')} |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", action="store_true")
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scenarios", default="handshakes,https-ka,h2,https-backend")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="fanout-tls-bench-")
    try:
        crt, key = make_cert(tmp)
        if args.candidates:
            print(f"# bench/tls.py --candidates --duration {args.duration} --rounds {args.rounds}")
            print_candidates(candidates(args.duration, args.rounds, tmp, crt, key))
            return
        print(f"# bench/tls.py --duration {args.duration} --rounds {args.rounds} --scenarios {args.scenarios}")
        print("| scenario | proxy | req/s (median) | errors | CPU µs/req | vs nginx | vs HAProxy |")
        print("|---|---|---|---|---|---|---|")
        for name in args.scenarios.split(","):
            results = scenario(name, args.duration, args.rounds, tmp, crt, key)
            med = {t: {k: statistics.median(r[k] for r in rs) for k in ["rps", "cpu_us"]}
                   for t, rs in results.items()}
            for t in results:
                ratio = lambda o: f"{med[t]['rps'] / med[o]['rps']:.2f}×" if t == "fanout" and o in med else ""
                print(f"| {name if t == 'fanout' else ''} | {t} | {med[t]['rps']:.0f} | "
                      f"{sum(r['errors'] for r in results[t])} | {med[t]['cpu_us']:.1f} | "
                      f"{ratio('nginx')} | {ratio('haproxy')} |", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
