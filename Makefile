# The two commands that do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench soak lint clean mutants

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .

# Security mutants (tests/mutants.py): each must be killed by the suite.  Minutes, not
# part of `make test`; run it before resolving an issue that touches security code.
mutants: $(STAMP)
	$(PY) tests/mutants.py $(MUTANTS_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench.py

# About 2 minutes of honest and hostile load against one server, then leak checks;
# longer with: make soak SOAK_SECONDS=1800
SOAK_SECONDS ?= 120
soak: $(STAMP)
	$(PY) benchmarks/soak.py --seconds $(SOAK_SECONDS)

# A headless server on a free port with a temporary home, one batch-mode text, both
# sides' output, then the server is stopped.
.ONESHELL:
demo: $(STAMP)
	@set -eu
	tmp=$$(mktemp -d)
	trap 'kill $$pid 2>/dev/null || true; rm -rf "$$tmp"' EXIT
	$(PY) -u server.py --headless -v --port 0 --home "$$tmp/server-home" \
	    --received-dir "$$tmp/server-received" > "$$tmp/server.log" 2>&1 &
	pid=$$!
	for i in $$(seq 100); do grep -qs '^identity ' "$$tmp/server.log" && break; sleep 0.1; done
	port=$$(sed -n 's/^listening on .*:\([0-9]*\)$$/\1/p' "$$tmp/server.log")
	fp=$$(sed -n 's/^identity //p' "$$tmp/server.log")
	echo "== client: python client.py --port $$port --fingerprint $$fp --send-text ..."
	$(PY) client.py --port "$$port" --home "$$tmp/client-home" --fingerprint "$$fp" \
	    --received-dir "$$tmp/client-received" -v \
	    --send-text "hello from the QSocket 2 demo"
	echo "== client identity: $$($(PY) client.py --home "$$tmp/client-home" --show-identity)"
	kill -INT $$pid; wait $$pid || true
	echo "== server output:"
	cat "$$tmp/server.log"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
