# elide-task-driver: build, test, benchmark and try the driver.
CARGO ?= cargo
PLUGIN_DIR := build/plugins

.PHONY: build release test lint unit gotest bench bench-zygote bench-floor dev clean

## build: debug binaries; the plugin is installed as build/plugins/elide (the name Nomad looks up)
build:
	$(CARGO) build --bins
	mkdir -p $(PLUGIN_DIR) build/bin
	install -m 0755 target/debug/elide-task-driver $(PLUGIN_DIR)/elide
	install -m 0755 target/debug/elide-daemon build/bin/elide-daemon

## release: optimised binaries, laid out like `build`
release:
	$(CARGO) build --release --bins
	mkdir -p $(PLUGIN_DIR) build/bin
	install -m 0755 target/release/elide-task-driver $(PLUGIN_DIR)/elide
	install -m 0755 target/release/elide-daemon build/bin/elide-daemon

## test: formatting, lints, every Rust test, and the go-plugin conformance test
## (gotest reuses the binaries `cargo test` built: `cargo build` would rebuild every dependency
## without the dev-dependency feature set)
test: lint unit gotest

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps --quiet

unit:
	$(CARGO) test --all-targets

gotest:
	@if command -v go >/dev/null 2>&1 && [ -d tests/goplugin ]; then \
		$(CARGO) test --no-run --all-targets --quiet && cd tests/goplugin && go test -count=1 ./... ; \
	else \
		echo "SKIPPED: go-plugin conformance test (go not on PATH or tests/goplugin missing)"; \
	fi

## bench: plugin startup (handshake latency, RSS) and daemon warm pools vs cold interpreters
## (latency, memory, throughput, log throughput) on optimised binaries; results into BENCHMARKS.md
bench:
	BENCH_WRITE=$(CURDIR)/BENCHMARKS.md $(CARGO) bench --bench plugin_startup
	BENCH_WRITE=$(CURDIR)/BENCHMARKS.md $(CARGO) bench --bench daemon_pools
	BENCH_WRITE=$(CURDIR)/BENCHMARKS.md $(CARGO) bench --bench plugin_tasks

## bench-zygote: the python zygote driven alone (no daemon): CPU and private pages per job, where a
## job's time goes (python3 benches/zygote_alone.py --idle 50: idle snippets' memory instead)
bench-zygote:
	python3 benches/zygote_alone.py

## bench-floor: the least a fork-server python execution costs here (CPU, pages, idle memory),
## with no isolation step: the lower bound under the pooled python figures
bench-floor:
	python3 benches/fork_floor.py

## dev: build, then run a job's elide tasks through the real plugin and daemon as a Nomad client
## would (no Nomad needed): make dev JOB=examples/http-server.nomad
JOB ?= examples/hello-python.nomad
dev:
	$(CARGO) test --test run_job -- $(JOB)

clean:
	$(CARGO) clean
	rm -rf build
