#!/usr/bin/env python3
"""The cost of a route's `auth` against the same route without it, and nginx's auth_basic
beside it. `make bench-auth`.

One fanout (one worker) with five routes over the nginx backend of bench/run.py — /none,
/basic (bcrypt cost 5, `htpasswd -B`'s default), /key (api_key), /jwt (ES256 against a
JWKS file) — and one nginx (one worker) with /none and /basic (auth_basic on the same
htpasswd file: libcrypt verifies bcrypt, on every request). Every request carries the
same three good credentials (the token in `X-Token`), so each route differs from /none by
its check alone, and fanout's per-credential memory (bcrypt verdict, checked token) is
what is measured after the first request; nginx has none. Rounds alternate the
order (fanout none, basic, key, jwt, nginx none, basic, then reversed); medians are
reported, and fanout's ratios to its own /none are paired by round.

Usage: bench/auth.py [--duration S] [--rounds N]
"""
import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402

FANOUT_PORT, NGINX_PORT = 19021, 19022


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def es256_token_and_jwks():
    """A token signed here with a fresh P-256 key, and the JWKS that checks it."""
    from cryptography.hazmat.primitives.asymmetric import ec, utils
    from cryptography.hazmat.primitives import hashes
    key = ec.generate_private_key(ec.SECP256R1())
    numbers = key.public_key().public_numbers()
    jwk = {"kty": "EC", "crv": "P-256", "kid": "bench", "alg": "ES256",
           "x": b64(numbers.x.to_bytes(32, "big")), "y": b64(numbers.y.to_bytes(32, "big"))}
    header = b64(json.dumps({"alg": "ES256", "typ": "JWT", "kid": "bench"}).encode())
    claims = b64(json.dumps({"sub": "bench-user", "exp": int(time.time()) + 86400}).encode())
    der = key.sign(f"{header}.{claims}".encode(), ec.ECDSA(hashes.SHA256()))
    r, s = utils.decode_dss_signature(der)
    signature = b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    return f"{header}.{claims}.{signature}", {"keys": [jwk]}


def bcrypt_hash(password):
    import bcrypt
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(5)).decode()


def fanout_conf(tmp):
    backends = ", ".join(f"127.0.0.1:{p}" for p in run.BACKENDS)
    return run.fanout_server(tmp, "fanout", 1, FANOUT_PORT) + f"""defaults: {{ access_log: off }}
upstreams:
  be: {{ backends: [{backends}] }}
routes:
  - {{ name: none, match: {{ prefix: /none }}, upstream: be }}
  - name: basic
    match: {{ prefix: /basic }}
    upstream: be
    auth: {{ basic: {{ htpasswd: {tmp}/users }} }}
  - name: key
    match: {{ prefix: /key }}
    upstream: be
    auth: {{ api_key: {{ keys_file: {tmp}/keys }} }}
  - name: jwt
    match: {{ prefix: /jwt }}
    upstream: be
    auth: {{ jwt: {{ jwks_file: {tmp}/jwks.json, algorithms: [ES256], header: X-Token }} }}
"""


def nginx_conf(tmp):
    servers = "\n".join(f"    server 127.0.0.1:{p};" for p in run.BACKENDS)
    proxy = 'proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection "";'
    return run.nginx_head(tmp, "nginx") + f"""http {{
  access_log off;
  keepalive_requests 1000000;
  upstream be {{
{servers}
    keepalive 256;
  }}
  server {{
    listen 127.0.0.1:{NGINX_PORT};
    location /none {{ {proxy} }}
    location /basic {{ auth_basic "bench"; auth_basic_user_file {tmp}/users; {proxy} }}
  }}
}}
"""


def script(tmp, name, path, headers):
    """A wrk script that asks `path` with `headers` on every request."""
    lua = os.path.join(tmp, f"{name}.lua")
    with open(lua, "w") as f:
        f.write(f'wrk.path = "{path}"\n')
        for k, v in headers.items():
            f.write(f'wrk.headers["{k}"] = "{v}"\n')
    return lua


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="fanout-bench-auth-")
    # nginx's workers (not root) read the htpasswd file.
    os.chmod(tmp, 0o755)
    procs = []
    try:
        token, jwks = es256_token_and_jwks()
        with open(f"{tmp}/users", "w") as f:
            f.write(f"bench:{bcrypt_hash('bench-password')}\n")
        with open(f"{tmp}/keys", "w") as f:
            f.write("bench-key-0123456789abcdef bench-app\n")
        with open(f"{tmp}/jwks.json", "w") as f:
            json.dump(jwks, f)
        basic = "Basic " + base64.b64encode(b"bench:bench-password").decode()
        with open(os.path.join(tmp, "backend.conf"), "w") as f:
            f.write(run.backend_conf(tmp))
        os.makedirs(os.path.join(tmp, "backend_body"), exist_ok=True)
        procs.append(run.start(["nginx", "-c", f"{tmp}/backend.conf"], "backend", run.BACKENDS[0], tmp))
        with open(f"{tmp}/fanout.yaml", "w") as f:
            f.write(fanout_conf(tmp))
        with open(f"{tmp}/nginx.conf", "w") as f:
            f.write(nginx_conf(tmp))
        fanout = run.start([run.FANOUT, "-c", f"{tmp}/fanout.yaml"], "fanout", FANOUT_PORT, tmp)
        nginx = run.start(["nginx", "-c", f"{tmp}/nginx.conf"], "nginx", NGINX_PORT, tmp)
        procs += [fanout, nginx]
        # Every request carries the same three credentials (the token in X-Token, since
        # basic takes Authorization), so that each pair differs by the route's check alone.
        creds = {"Authorization": basic, "X-API-Key": "bench-key-0123456789abcdef", "X-Token": token}
        cases = {
            "fanout none": (FANOUT_PORT, fanout, "/none/bench"),
            "fanout basic": (FANOUT_PORT, fanout, "/basic/bench"),
            "fanout api_key": (FANOUT_PORT, fanout, "/key/bench"),
            "fanout jwt": (FANOUT_PORT, fanout, "/jwt/bench"),
            "nginx none": (NGINX_PORT, nginx, "/none/bench"),
            "nginx auth_basic": (NGINX_PORT, nginx, "/basic/bench"),
        }
        results = {n: [] for n in cases}
        order = list(cases)
        for r in range(args.rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                port, proc, path = cases[name]
                lua = script(tmp, name.replace(" ", "-"), path, creds)
                res = run.run_wrk(port, 64, args.duration, lua, tmp, proc)
                if res["errors"]:
                    sys.exit(f"{name}: {res['errors']} errors or non-2xx answers")
                results[name].append(res)
                print(f"  round {r + 1} {name:17} {res['rps']:>9.0f} req/s  p99 {res['p99']:.2f} ms  "
                      f"CPU {res['cpu_us']:.1f} µs/req", file=sys.stderr)
        print(f"# {time.strftime('%Y-%m-%d')}, bench/auth.py --duration {args.duration} "
              f"--rounds {args.rounds} (wrk -t1 -c64, one worker each, one credential)")
        print("| route | req/s (median) | p50 ms | p99 ms | CPU µs/req | req/s vs its own none (paired) |")
        print("|---|---|---|---|---|---|")
        for name in cases:
            med = {k: statistics.median(x[k] for x in results[name]) for k in ["rps", "p50", "p99", "cpu_us"]}
            base = "fanout none" if name.startswith("fanout") else "nginx none"
            ratio = statistics.median(b["rps"] / a["rps"] for a, b in zip(results[base], results[name]))
            print(f"| {name} | {med['rps']:.0f} | {med['p50']:.2f} | {med['p99']:.2f} | "
                  f"{med['cpu_us']:.1f} | {ratio:.3f}× |")
    finally:
        run.stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
