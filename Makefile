# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment when missing and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
STATE  ?= .siterecovery
UI_PORT ?= 4200
# The UI server's database: postgres (a private PostgreSQL 15 cluster in $(STATE)/postgres) or sqlite.
DB ?= postgres
# The 25 slowest tests are listed at the end of every run: where CI time goes.
PYTEST_ARGS ?= --durations=25

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/$(STATE)/prefect
export PYTHONPATH := $(CURDIR)

.PHONY: all venv venv-libvirt system demo demo-clean demo-qemu test test-fast test-slow lint validate clean bench ui ui-stop

all: test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/pip install -q -e '.[orchestration,test]' 2>&1 | grep -v "^WARNING: Location" || true
	mkdir -p $(PREFECT_HOME)
	$(BIN)/python -c "import siterecovery, prefect, paramiko, xxhash, zstandard"
	touch $(STAMP)

venv: $(STAMP)

# The `libvirt` extra (libvirt-python) builds against libvirt-dev, so it is installed only where that is
# present (`make system` installs it); elsewhere the libvirt tests skip. Checked on every run, so a venv
# made before libvirt-dev was installed (`make demo` first, then `make test`) still gets it.
venv-libvirt: venv
	@if pkg-config --exists libvirt 2>/dev/null && ! $(BIN)/python -c "import libvirt" 2>/dev/null; then \
		$(BIN)/pip install -q -e '.[libvirt]' 2>&1 | grep -v "^WARNING: Location" || true; fi

# Debian packages the tests and the demo use (sshd, rsync, chromium, virsh); skipped when present.
system:
	bash scripts/setup-system.sh

validate: venv
	$(BIN)/siterecovery validate plans

# The embedded demo: two sites on this machine (a private sshd when openssh-server is installed),
# a real three-tier shop protected, drilled, failed over and failed back through Prefect. See docs/DEMO.md.
demo: venv
	@test -x /usr/sbin/sshd || bash scripts/setup-system.sh --ssh-only || echo "no sshd: the demo uses local transport"
	$(BIN)/siterecovery demo

demo-clean: venv
	$(BIN)/siterecovery demo --clean
	$(BIN)/siterecovery demo --qemu --clean

# The same drill, planned failover and failback with two real QEMU guests (TCG; KVM when /dev/kvm works).
# Needs qemu-system-x86, qemu-utils and the guest kit's packages: `make system` installs them.
demo-qemu: venv
	@test -x /usr/sbin/sshd || bash scripts/setup-system.sh --ssh-only || echo "no sshd: the demo uses local transport"
	$(BIN)/siterecovery demo --qemu

lint: venv
	$(BIN)/ruff check src flows tasks tests bench
	$(BIN)/mypy

# Long trials (many QEMU crash trials, a Prefect server restart) are marked slow: `make test-slow`.
test: system venv-libvirt lint
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

test-slow: system venv-libvirt
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

# The unit tier only: no sshd, no Prefect server, no browser.
test-fast: venv
	$(BIN)/pytest -m "not sshd and not prefect_server and not browser and not slow" $(PYTEST_ARGS)

# A local Prefect UI on 127.0.0.1:$(UI_PORT): server (database: a private PostgreSQL cluster in
# $(STATE)/postgres, or with DB=sqlite a file in $(STATE)/prefect), the process work pool, every
# deployment rendered from plans/, and a worker. `make ui-stop` stops exactly those.
ui: venv
	@test "$(DB)" != postgres || test -x /usr/lib/postgresql/15/bin/initdb || bash scripts/setup-system.sh --postgres-only
	$(BIN)/siterecovery deployments render
	SITERECOVERY_DB=$(DB) $(BIN)/siterecovery ui up --state $(STATE) --port $(UI_PORT)

ui-stop:
	@if [ -x $(BIN)/siterecovery ]; then $(BIN)/siterecovery ui down --state $(STATE); fi

bench: venv system
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) $(STATE) .pytest_cache .mypy_cache .ruff_cache
