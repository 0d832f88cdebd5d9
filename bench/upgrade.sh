#!/usr/bin/env bash
# Graceful upgrade under load, the way systemd's ExecReload does it: wrk -t2 -c32 -d10s
# against a daemonized fanout; after 3 s: check the file, SIGQUIT the running process,
# start the new one with -u -d. Prints what wrk saw (any socket error or non-2xx answer is
# a failed request), how long the hand-over took and when the old process was gone.
set -euo pipefail
cd "$(dirname "$0")/.."
bench/deps.sh wrk:wrk nginx:nginx-light
make -s build
bin=$(pwd)/target/release/fanout
tmp=$(mktemp -d)
cleanup() {
  [ -f "$tmp/fanout.pid" ] && kill "$(cat "$tmp/fanout.pid")" 2>/dev/null || true
  [ -f "$tmp/backend.pid" ] && kill "$(cat "$tmp/backend.pid")" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
cat > "$tmp/backend.conf" <<CONF
worker_processes 1; daemon off; pid $tmp/backend.pid; error_log $tmp/backend.err;
events { worker_connections 8192; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:19501; location / { return 200 "ok\n"; } } }
CONF
cat > "$tmp/fanout.yaml" <<CONF
server: { threads: 2, pid_file: $tmp/fanout.pid, upgrade_sock: $tmp/upgrade.sock,
          grace_period_seconds: 3, graceful_shutdown_timeout_seconds: 2 }
listen: ["127.0.0.1:19500"]
defaults: { access_log: off }
upstreams: { be: { backends: [127.0.0.1:19501] } }
routes: [ { match: { prefix: / }, upstream: be } ]
CONF
nginx -c "$tmp/backend.conf" & sleep 0.5
"$bin" -d -c "$tmp/fanout.yaml" 2>"$tmp/start.log"
for _ in $(seq 50); do [ -s "$tmp/fanout.pid" ] && break; sleep 0.1; done
old=$(cat "$tmp/fanout.pid")
wrk -t2 -c32 -d10s --latency http://127.0.0.1:19500/ > "$tmp/wrk.out" &
wrk_pid=$!
sleep 3
"$bin" -t -c "$tmp/fanout.yaml" >/dev/null
t0=$(date +%s.%N)
kill -QUIT "$old"
"$bin" -u -d -c "$tmp/fanout.yaml" 2>"$tmp/upgrade.log"
t1=$(date +%s.%N)
while kill -0 "$old" 2>/dev/null; do sleep 0.05; done
t2=$(date +%s.%N)
wait $wrk_pid
echo "old pid $old -> new pid $(cat "$tmp/fanout.pid")"
printf 'hand-over (SIGQUIT to new process serving): %.2f s; old process gone after %.2f s\n' \
  "$(echo "$t1 - $t0" | bc)" "$(echo "$t2 - $t0" | bc)"
grep -E "requests in|Socket errors|Non-2xx|Requests/sec|  99%" "$tmp/wrk.out"
if grep -qE "Socket errors|Non-2xx" "$tmp/wrk.out"; then echo "FAILED requests during the upgrade"; exit 1; fi
echo "zero failed requests"
