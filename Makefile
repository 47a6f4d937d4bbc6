# kvmconf: `make` sets up .venv and compiles cluster.conf + site.toml into build/.
# `make test` installs what the tests need (Debian packages when root) and runs the whole suite.

PYTHON  ?= python3
VENV    ?= .venv
# A variable given empty (make CLUSTER=) counts as unset, as everywhere else: override takes the
# default again even over the command line, where ?= would keep the empty value.
override CLUSTER := $(or $(CLUSTER),$(KVMCONF_CLUSTER),cluster.conf)
override SITE    := $(or $(SITE),$(KVMCONF_SITE),site.toml)
override BUILD   := $(or $(BUILD),$(KVMCONF_BUILD),build)
PY      := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: all build check lint test test-deps clean doc

all: build

# The venv is rebuilt only when the requirements change.
$(VENV)/.base: requirements.txt bin/debian-packages-base.txt
	@command -v $(PYTHON) >/dev/null && $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null \
	  || bin/ensure-debian-packages bin/debian-packages-base.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	@touch $@

$(VENV)/.test: $(VENV)/.base requirements-test.txt bin/debian-packages-test.txt
	bin/ensure-debian-packages bin/debian-packages-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	@touch $@

build: $(VENV)/.base
	$(PY) -m generators --cluster $(CLUSTER) --site $(SITE) --build $(BUILD)

test-deps: $(VENV)/.test

lint: $(VENV)/.test
	$(PY) -m ruff check .
	$(PY) -m mypy

# Fast tier: lint, types, unit and golden tests; no real consumers, no services.
check: lint
	$(PY) -m pytest -q -m "not consumer and not services and not slow" $(PYTEST_ARGS)

# Everything: the fast tier plus real consumers and real services. Nothing is skipped here.
test: lint
	KVMCONF_REQUIRE_TOOLS=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# Include the generated ssh config from the user's own, once, above their entries.
~/.ssh/config: build
	$(PY) -m generators.ssh_include --build $(BUILD) --config $@

doc: $(VENV)/.base
	@$(PY) -m generators --doc

# Like the writer, only a folder kvmconf wrote (its stamp inside) or an empty one: BUILD=/srv meant for /srv/build
# must not take /srv with it.
clean:
	@if [ -e '$(BUILD)/.kvmconf-stamp' ] || [ -z "$$(ls -A '$(BUILD)' 2>/dev/null)" ]; then \
	  echo "rm -rf $(BUILD)"; rm -rf '$(BUILD)'; \
	else \
	  echo "kvmconf: $(BUILD): not a build folder kvmconf wrote (it is not empty and has no .kvmconf-stamp), so make clean removes nothing" >&2; \
	  exit 2; \
	fi
