#!/usr/bin/env bash
# Benchmarks fanout against nginx (proxy_pass) and HAProxy on this machine.
# Installs wrk, nginx-light and haproxy from Debian when missing, builds fanout, then runs
# bench/run.py (pass its options through, e.g. --duration 5 --rounds 3 --scenarios ka1,ka2).
set -euo pipefail
cd "$(dirname "$0")/.."
bench/deps.sh wrk:wrk nginx:nginx-light haproxy:haproxy python3:python3
make -s build
cargo build --release --locked --example plain_pingora --example slow_backend
exec python3 bench/run.py "$@"
