#!/usr/bin/env bash
# Installs from Debian whatever the benchmarks need and the machine lacks.
# Usage: bench/deps.sh COMMAND:PACKAGE [COMMAND:PACKAGE ...]
set -euo pipefail
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
missing=()
for pair in "$@"; do
  command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${missing[@]}"
fi
