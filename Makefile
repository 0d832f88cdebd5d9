# fanout — the two commands of the README, and the helpers they use.
#   make run    the gateway on its built-in demo configuration
#   make test   unit and integration tests
# Both install what a fresh Debian machine lacks (cmake, which Pingora's build needs).

CARGO ?= cargo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test deps build lint fmt bench bench-reload bench-decompose bench-overload bench-clients bench-tls bench-tls-candidates bench-spool bench-cache bench-redis bench-auth bench-compress bench-dead-backend bench-tracing fuzz check-conf upgrade-demo verify-unit image image-test systemd-test

deps:
	@command -v cargo >/dev/null || { echo "cargo is missing: install Rust with rustup first" >&2; exit 1; }
	@command -v cmake >/dev/null || { \
		echo "installing cmake (needed to build Pingora)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq cmake; }
	@command -v cc >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq build-essential; }

build: deps
	$(CARGO) build --release --locked

run: build
	./target/release/fanout --demo

# The shared rate-limit tests start their own redis-server (Debian's package; its own
# service, if the package starts one, is stopped again: the tests use free ports). The
# dashboard test drives Debian's chromium through its chromium-driver (/usr/bin/chromedriver,
# started by the test on a free port; nothing is downloaded).
test: deps
	@command -v redis-server >/dev/null && command -v redis-cli >/dev/null || { \
		echo "installing redis-server (the shared rate-limit tests run it)"; \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; \
		$(SUDO) service redis-server stop >/dev/null 2>&1 || true; }
	@[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || { \
		echo "installing chromium and chromium-driver (the dashboard test runs them)"; \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }
	$(CARGO) test --release --locked

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --locked --all-targets -- -D warnings

check-conf: build
	@for f in conf/*.yaml; do ./target/release/fanout -t -c $$f || exit 1; done

bench: build
	bench/run.sh

# Where a keep-alive request's cost goes in fanout, plain Pingora and nginx (CPU, syscalls,
# switches, wake-ups, allocations and who asks for them), and tail latency under overload.
bench-decompose: build
	bench/deps.sh nginx:nginx-light wrk:wrk perf:linux-perf strace:strace python3:python3
	$(CARGO) build --release --locked --example plain_pingora --example slow_backend
	python3 bench/decompose.py
	python3 bench/decompose.py --sites

bench-overload: build
	bench/deps.sh nginx:nginx-light wrk:wrk python3:python3
	$(CARGO) build --release --locked --example plain_pingora --example slow_backend
	@[ -x bench/.tools/bin/oha ] || $(CARGO) install --locked oha --version 1.16.0 --root bench/.tools
	python3 bench/overload.py
	python3 bench/capacity.py

# Slow, idle and hostile clients: memory per connection and slowhttptest, against nginx.
bench-clients: build
	bench/deps.sh nginx:nginx-light wrk:wrk slowhttptest:slowhttptest python3:python3
	python3 bench/clients.py

# TLS handshakes, keep-alive HTTPS, h2 (h2load) and HTTPS backends, against nginx and HAProxy.
bench-tls: build
	bench/deps.sh nginx:nginx-light haproxy:haproxy wrk:wrk h2load:nghttp2-client openssl:openssl python3:python3
	python3 bench/tls.py

# A configuration reload: in place (p50/p99, CPU, RSS after 1,000) against a process swap.
bench-reload: build
	bench/deps.sh python3:python3
	python3 bench/reload.py

# The broadcast spool: accepted/s, the 202's p99 and CPU per request with the memory spool
# and the disk spool under each fsync policy; disk bytes per event.
bench-spool: build
	bench/deps.sh nginx:nginx-light wrk:wrk python3:python3 redis-server:redis-server redis-cli:redis-tools
	python3 bench/spool.py

# Rate limits decided in Redis against decided in the process (req/s, p99, CPU), and one
# Redis's ceiling in decisions per second (redis-benchmark running the same script).
bench-auth: build
	bench/deps.sh nginx:nginx-light wrk:wrk python3:python3
	@python3 -c "import bcrypt, cryptography" 2>/dev/null || python3 -m pip install -q bcrypt cryptography
	python3 bench/auth.py

# FANOUT_BASE=<an earlier fanout binary>: the cost of a route without `compress` against it.
bench-compress: build
	bench/deps.sh nginx:nginx-light wrk:wrk python3:python3 curl:curl
	python3 bench/compress.py

bench-dead-backend: build
	bench/deps.sh nginx:nginx-light wrk:wrk python3:python3
	python3 bench/dead_backend.py

bench-tracing: build
	bench/deps.sh nginx:nginx-light wrk:wrk python3:python3
	python3 bench/tracing.py

bench-redis: build
	bench/deps.sh nginx:nginx-light wrk:wrk python3:python3 redis-server:redis-server redis-benchmark:redis-tools
	python3 bench/redis_limits.py

# The response cache: hits/s and p99 (1 KiB and 1 MiB objects) against nginx proxy_cache
# (on tmpfs) and Varnish; a cold-key stampede's origin requests.
bench-cache: build
	bench/deps.sh nginx:nginx-light wrk:wrk python3:python3 varnishd:varnish
	python3 bench/cache.py

# The TLS library candidates (Pingora built with rustls, then with OpenSSL) on handshakes
# and keep-alive HTTPS, beside nginx. OpenSSL's headers come from Debian's libssl-dev.
bench-tls-candidates: deps
	bench/deps.sh nginx:nginx-light wrk:wrk openssl:openssl python3:python3 pkg-config:pkg-config
	@[ -f /usr/include/openssl/ssl.h ] || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq libssl-dev; }
	python3 bench/tls.py --candidates

# libFuzzer through cargo-fuzz (nightly): each target for FUZZ_SECONDS, from its corpus in
# fuzz/corpus/ (new inputs worth keeping are added there; crashes land in fuzz/artifacts/).
# h2_listener runs a whole gateway in the fuzzing process: connections it still serves when
# an input ends are live, not leaked, so LeakSanitizer's per-input check is off for it.
FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?= framing path config lanes_reader router h2_listener proxy_protocol jwt
fuzz: deps
	@command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz
	@command -v c++ >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq g++; }
	for t in $(FUZZ_TARGETS); do \
		leaks=$$([ $$t = h2_listener ] && echo -detect_leaks=0); \
		$(CARGO) +nightly fuzz run $$t fuzz/corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) $$leaks || exit 1; \
	done

upgrade-demo: build
	bench/upgrade.sh

verify-unit: build
	systemd/verify.sh

# The container image (Containerfile), built offline from `make build`'s binary with podman
# or docker (podman is installed when neither works). Prints "SKIPPED: why" and exits 0
# where no engine can run here.
image: build
	@container/build.sh; rc=$$?; [ $$rc = 3 ] && exit 0; exit $$rc

# Runs the image: /health through a published port, a request to a backend on the host,
# the HEALTHCHECK, the uid, SIGTERM with a request in flight.
image-test: build
	@container/run-test.sh image

# The systemd unit under a real systemd (PID 1 of a Debian container made offline with
# debootstrap): install as the README says, start, reload three times under load, stop.
systemd-test: build
	@container/run-test.sh systemd
