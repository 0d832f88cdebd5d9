#!/usr/bin/env python3
"""`make image-test`: runs the fanout image as a user would and checks what the README
promises. A backend on the host's loopback (reached from the container through
slirp4netns' host-loopback address 10.0.2.2, so no traffic leaves 127.0.0.1), the gateway's
and the admin ports published on 127.0.0.1:

  1. the container comes up, /health answers through the published admin port (time to
     ready is printed);
  2. a request through the published gateway port reaches the backend on the host and
     comes back with an X-Request-Id; the access log is in `logs`;
  3. the image's HEALTHCHECK (`fanout --health-check`) passes inside the container;
  4. it runs as uid 65532, with its memory (RSS) printed;
  5. `stop` (SIGTERM) while a request is in flight: that request finishes with its 200, the
     container exits with 0 within the stop timeout;
  6. the README's hand-over between two containers (host network, /run/fanout shared in a
     volume): a second container started with -u takes the sockets when the first gets
     SIGQUIT, and keep-alive clients running throughout see no failed request;
  7. quick mode from the environment, as FanOut's users start it: no arguments, no file,
     `-e FANOUT_BROADCAST=URL,URL`: `POST /fanout` gets 202 and both targets get it.

Every wait is bounded; the container and the backend are removed whatever happens.
Ends with "N passed, N failed". Usage: container/test_image.py IMAGE (ENGINE from
container/engine.sh).
"""
import http.client
import http.server
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

ENGINE = os.environ.get("ENGINE", "podman")
IMAGE = sys.argv[1] if len(sys.argv) > 1 else "fanout:latest"
NAME = f"fanout-image-test-{os.getpid()}"
SLOW_SECONDS = 2.0
results = []


def check(name, ok, detail=""):
    results.append(ok)
    print(f"{'ok' if ok else 'FAIL'} - {name}{': ' + detail if detail else ''}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Backend(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    slow_started = threading.Event()

    def do_GET(self):
        if self.path == "/slow":
            Backend.slow_started.set()
            time.sleep(SLOW_SECONDS)
        body = f"host backend saw {self.path}".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    posts = []

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length)
        Backend.posts.append((self.path, body, {k.lower(): v for k, v in self.headers.items()}))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def engine(*args, timeout=60, check_rc=True):
    out = subprocess.run([ENGINE, *args], capture_output=True, text=True, timeout=timeout)
    if check_rc and out.returncode != 0:
        raise RuntimeError(f"{ENGINE} {' '.join(args)}: {out.stderr.strip()}")
    return out


def get(port, path, timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode()
    finally:
        conn.close()


def wait_ready(port, limit=30.0):
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            status, _, _ = get(port, "/health", timeout=1)
            if status == 200:
                return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def start_backend():
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    backend.daemon_threads = True
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    return backend


def write_conf(text):
    tmp = tempfile.mkdtemp()
    os.chmod(tmp, 0o755)
    conf = os.path.join(tmp, "fanout.yaml")
    with open(conf, "w") as f:
        f.write(text)
    os.chmod(conf, 0o644)
    return conf


def handover(backend_port):
    """Two containers on the host's network share /run/fanout through a volume: the second,
    started with -u, receives the listening sockets when the first gets SIGQUIT."""
    gw, admin_a, admin_b = free_port(), free_port(), free_port()
    volume = f"{NAME}-run"
    conf = lambda admin: write_conf(f"""server:
  upgrade_sock: /run/fanout/upgrade.sock
  grace_period_seconds: 2
  graceful_shutdown_timeout_seconds: 1
listen: ["127.0.0.1:{gw}"]
admin: 127.0.0.1:{admin}
upstreams:
  host: {{ backends: [127.0.0.1:{backend_port}] }}
routes:
  - match: {{ prefix: / }}
    upstream: host
""")
    names = [f"{NAME}-a", f"{NAME}-b"]
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0}
    lock = threading.Lock()

    def client():
        conn = None
        while not stop.is_set():
            try:
                conn = conn or http.client.HTTPConnection("127.0.0.1", gw, timeout=10)
                conn.request("GET", "/handover")
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                ok = False
                conn = None
            with lock:
                counts["ok" if ok else "failed"] += 1

    threads = []
    try:
        engine("run", "-d", "--name", names[0], "--network", "host", "-v", f"{volume}:/run/fanout",
               "-v", f"{conf(admin_a)}:/etc/fanout/fanout.yaml:ro", IMAGE)
        if not wait_ready(admin_a):
            check("hand-over: the first container comes up", False)
            return
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1)
        engine("run", "-d", "--name", names[1], "--network", "host", "-v", f"{volume}:/run/fanout",
               "-v", f"{conf(admin_b)}:/etc/fanout/fanout.yaml:ro", IMAGE,
               "-u", "-c", "/etc/fanout/fanout.yaml")
        engine("kill", "--signal", "QUIT", names[0])
        took = time.time()
        ready = wait_ready(admin_b)
        exited = False
        deadline = time.time() + 30
        while time.time() < deadline and not exited:
            state = engine("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", names[0]).stdout.split()
            exited = state[0] == "exited"
            time.sleep(0.2)
        took = time.time() - took
        time.sleep(1)
        stop.set()
        for t in threads:
            t.join(15)
        check("hand-over between containers: the new one serves, the old one exits 0, "
              "no request fails", ready and exited and state[1] == "0" and counts["failed"] == 0
              and counts["ok"] > 0,
              f"{counts['ok']} requests, {counts['failed']} failed; old container gone after {took:.1f} s")
    finally:
        stop.set()
        for t in threads:
            t.join(15)
        for n in names:
            engine("rm", "-f", n, check_rc=False)
        engine("volume", "rm", "-f", volume, check_rc=False)


def quick_mode(backend_port):
    """The image with no arguments and FANOUT_BROADCAST: a broadcast route, no file."""
    gw, admin = free_port(), free_port()
    name = f"{NAME}-quick"
    targets = f"http://10.0.2.2:{backend_port}/one,http://10.0.2.2:{backend_port}/two"
    try:
        engine("run", "-d", "--name", name,
               "--network", "slirp4netns:allow_host_loopback=true",
               "-p", f"127.0.0.1:{gw}:8080", "-p", f"127.0.0.1:{admin}:9091",
               "-e", f"FANOUT_BROADCAST={targets}", IMAGE)
        ready = wait_ready(admin)
        conn = http.client.HTTPConnection("127.0.0.1", gw, timeout=10)
        conn.request("POST", "/fanout", body=b'{"event":"quick"}',
                     headers={"content-type": "application/json", "authorization": "Bearer x"})
        resp = conn.getresponse()
        answer = resp.read().decode()
        conn.close()
        deadline = time.time() + 10
        while time.time() < deadline and len([p for p in Backend.posts if p[1] == b'{"event":"quick"}']) < 2:
            time.sleep(0.05)
        got = sorted(p[0] for p in Backend.posts if p[1] == b'{"event":"quick"}')
        redacted = all("authorization" not in p[2] for p in Backend.posts)
        check("quick mode from the environment (-e FANOUT_BROADCAST, no arguments): 202, "
              "both targets delivered, Authorization not forwarded",
              ready and resp.status == 202 and '"targets":2' in answer.replace(" ", "")
              and got == ["/one", "/two"] and redacted,
              f"{resp.status} {answer!r}, targets got {got}")
    finally:
        engine("rm", "-f", name, check_rc=False)


def main():
    gw, admin = free_port(), free_port()
    backend = start_backend()
    conf = write_conf(f"""server:
  grace_period_seconds: 4
  graceful_shutdown_timeout_seconds: 1
listen: ["0.0.0.0:8080"]
admin: 0.0.0.0:9091
upstreams:
  host:
    backends: [10.0.2.2:{backend.server_address[1]}]
    timeouts: {{ read: 10s }}
routes:
  - match: {{ prefix: / }}
    upstream: host
""")
    try:
        started = time.time()
        engine("run", "-d", "--name", NAME,
               "--network", "slirp4netns:allow_host_loopback=true",
               "-p", f"127.0.0.1:{gw}:8080", "-p", f"127.0.0.1:{admin}:9091",
               "-v", f"{conf}:/etc/fanout/fanout.yaml:ro", IMAGE)
        ready = wait_ready(admin)
        check("the container answers /health through the published admin port", ready,
              f"ready {time.time() - started:.2f} s after `run`" if ready else "not within 30 s")
        if not ready:
            print(engine("logs", NAME, check_rc=False).stderr[-2000:])
            return

        status, headers, body = get(gw, "/through/the/gateway")
        check("a request through the published port reaches the backend on the host",
              status == 200 and body == "host backend saw /through/the/gateway"
              and "x-request-id" in {k.lower() for k in headers}, f"{status} {body!r}")

        hc = engine("healthcheck", "run", NAME, check_rc=False) if ENGINE == "podman" else \
            engine("exec", NAME, "/usr/local/bin/fanout", "--health-check", check_rc=False)
        check("the image's HEALTHCHECK passes", hc.returncode == 0, hc.stderr.strip()[-200:])

        pid = engine("inspect", "--format", "{{.State.Pid}}", NAME).stdout.strip()
        status_lines = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status") if ":" in line)
        uid = status_lines["Uid"].split()[0]
        check("it runs as uid 65532", uid == "65532", f"uid {uid}, RSS {status_lines['VmRSS'].strip()}")

        inflight = {}

        def slow():
            try:
                inflight["answer"] = get(gw, "/slow", timeout=20)
            except OSError as e:
                inflight["error"] = repr(e)

        t = threading.Thread(target=slow)
        t.start()
        got = Backend.slow_started.wait(10)
        check("the slow request reached the backend", got)
        stop_started = time.time()
        engine("stop", "-t", "20", NAME, timeout=40)
        stopped_in = time.time() - stop_started
        t.join(25)
        answer = inflight.get("answer")
        check("the request in flight at SIGTERM finishes with its answer",
              answer is not None and answer[0] == 200 and answer[2] == "host backend saw /slow",
              repr(answer[::2] if answer else inflight.get("error")))
        code = engine("inspect", "--format", "{{.State.ExitCode}}", NAME).stdout.strip()
        check("the container exits with 0 after SIGTERM, before the stop timeout",
              code == "0" and stopped_in < 20, f"exit {code} after {stopped_in:.1f} s")
        logs = engine("logs", NAME, check_rc=False)
        check("the access log is in the container's output",
              '"path":"/through/the/gateway"' in logs.stdout + logs.stderr)
    finally:
        engine("rm", "-f", NAME, check_rc=False)
    try:
        handover(backend.server_address[1])
        quick_mode(backend.server_address[1])
    finally:
        backend.shutdown()
    passed = sum(results)
    print(f"{passed} passed, {len(results) - passed} failed")


if __name__ == "__main__":
    main()
    sys.exit(0 if results and all(results) else 1)
