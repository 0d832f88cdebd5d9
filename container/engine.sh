# Sourced by the container scripts: picks a container engine and sets ENGINE, or says why
# there is none and returns 1. Podman is installed from Debian when no engine works;
# container/containers.conf (runtime runc, ulimits the host allows) is used for podman
# through CONTAINERS_CONF, so the host's own configuration is never touched.

CONTAINER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

pick_engine() {
    if [ -n "${ENGINE:-}" ]; then
        :
    elif command -v podman >/dev/null 2>&1; then
        ENGINE=podman
    elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        ENGINE=docker
    elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing podman and runc (no container engine found)" >&2
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc; } >&2; then
            ENGINE_MISSING="podman could not be installed with apt-get"
            return 1
        fi
        ENGINE=podman
    else
        ENGINE_MISSING="no podman, no running docker daemon, and no root to install podman"
        return 1
    fi
    if [ "$ENGINE" = podman ]; then
        export CONTAINERS_CONF="$CONTAINER_DIR/containers.conf"
        # HEALTHCHECK is a Docker-format instruction: OCI images drop it.
        BUILD_FORMAT=(--format docker)
    else
        BUILD_FORMAT=()
    fi
    if ! "$ENGINE" info >/dev/null 2>&1; then
        ENGINE_MISSING="$ENGINE is installed but does not work here: $("$ENGINE" info 2>&1 | tail -1)"
        return 1
    fi
}
