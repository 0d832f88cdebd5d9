#!/usr/bin/env bash
# Benchmarks fanout against nginx (proxy_pass) and HAProxy on this machine.
# Installs wrk, nginx-light and haproxy from Debian when missing, builds fanout, then runs
# bench/run.py (pass its options through, e.g. --duration 5 --rounds 3 --scenarios ka1,ka2).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || missing+=(nginx-light)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v python3 >/dev/null || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${missing[@]}"
fi
make -s build
cargo build --release --locked --example plain_pingora --example slow_backend
exec python3 bench/run.py "$@"
