#!/usr/bin/env bash
# `make image-test` / `make systemd-test`: picks an engine, then runs the test. Where no
# engine can run, prints "<test>: SKIPPED: why" and exits 0, so CI shows the skip.
set -uo pipefail
cd "$(dirname "$0")/.."
. container/engine.sh
what=$1
if ! pick_engine; then
    echo "$what-test: SKIPPED: $ENGINE_MISSING"
    exit 0
fi
export ENGINE
case $what in
    image)
        container/build.sh || exit 1
        exec python3 container/test_image.py fanout:latest ;;
    systemd)
        exec python3 container/test_systemd.py ;;
    *) echo "unknown test $what" >&2; exit 2 ;;
esac
