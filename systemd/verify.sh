#!/usr/bin/env bash
# Checks systemd/fanout.service with systemd-analyze verify, pointing it at the built
# binary (verify requires the executables to exist). Skips when systemd-analyze is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v systemd-analyze >/dev/null || { echo "systemd-analyze not found: skipped"; exit 0; }
bin="$(pwd)/target/release/fanout"
[ -x "$bin" ] || { echo "build fanout first (make build)"; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed "s#/usr/local/bin/fanout#$bin#g" systemd/fanout.service > "$tmp/fanout.service"
out=$(systemd-analyze verify "$tmp/fanout.service" 2>&1 || true)
# Lines about the host itself (no such user here, other units) are not the unit's problems.
problems=$(echo "$out" | grep -F "$tmp/fanout.service" | grep -v "Failed to resolve user\|Failed to resolve group" || true)
if [ -n "$problems" ]; then
  echo "$problems"
  exit 1
fi
echo "systemd/fanout.service: verify OK"
