#!/usr/bin/env bash
# Builds the fanout image offline (`make image`): no registry is reachable, so there is no
# base image to pull. The release binary that `make build` produced is staged into a root
# file system with exactly what it needs at run time — the shared libraries `ldd` names
# (glibc, libgcc_s), CA certificates for TLS upstreams, passwd/group entries for uid 65532,
# an nsswitch.conf, the example configuration — and Containerfile copies that root into a
# `FROM scratch` image. Prints the image's name and size.
#
# Usage: container/build.sh [IMAGE]   (default fanout:VERSION, also tagged fanout:latest)
set -euo pipefail
cd "$(dirname "$0")/.."
. container/engine.sh
pick_engine || { echo "image: SKIPPED: $ENGINE_MISSING" >&2; exit 3; }

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
image=${1:-fanout:$version}
bin=target/release/fanout
[ -x "$bin" ] || { echo "image: $bin is missing: run make build first" >&2; exit 1; }
[ -f /etc/ssl/certs/ca-certificates.crt ] || {
    echo "installing ca-certificates (the image's trust store)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ca-certificates >&2
}

stage=target/image
rm -rf "$stage"
root=$stage/root
writable=$stage/writable
mkdir -p "$root"/usr/local/bin "$root"/etc/fanout "$root"/etc/ssl/certs "$root"/tmp \
    "$writable"/run/fanout "$writable"/var/lib/fanout
# The debug info `profile.release` keeps for profiling is a hundred megabytes: not shipped.
objcopy --strip-debug "$bin" "$root/usr/local/bin/fanout"
for lib in $(ldd "$bin" | awk '/=> \// { print $3 } /ld-linux/ && !/=>/ { print $1 }'); do
    cp --parents -L "$lib" "$root"
done
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
cp conf/container.yaml "$root/etc/fanout/fanout.yaml"
cat > "$root/etc/passwd" <<'PW'
root:x:0:0:root:/root:/sbin/nologin
fanout:x:65532:65532:fanout:/nonexistent:/sbin/nologin
PW
cat > "$root/etc/group" <<'GR'
root:x:0:
fanout:x:65532:
GR
echo "hosts: files dns" > "$root/etc/nsswitch.conf"
chmod 1777 "$root/tmp"
cp Containerfile "$stage/"

revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
source=$(git config --get remote.origin.url 2>/dev/null || echo "fanout")
start=$(date +%s%N)
"$ENGINE" build "${BUILD_FORMAT[@]}" -q -t "$image" -t fanout:latest \
    --build-arg VERSION="$version" --build-arg REVISION="$revision" --build-arg SOURCE="$source" \
    -f "$stage/Containerfile" "$stage" >/dev/null
took=$(( ($(date +%s%N) - start) / 1000000 ))
size=$("$ENGINE" image inspect --format '{{.Size}}' "$image")
echo "image: built $image with $ENGINE in ${took} ms, $((size / 1024 / 1024)) MiB ($size bytes)"
