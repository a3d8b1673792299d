# One command each: `make serve` installs and starts the service on the shipped model;
# `make test` installs everything the tests need (Debian's prometheus and chromium, Python extras) and runs them.
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
PIP ?= python -m pip

.PHONY: serve test install-test

serve:
	$(PIP) install -e ".[serve]"
	limoe serve

install-test:
	@missing="$$(for p in prometheus chromium; do command -v $${p%%:*} >/dev/null 2>&1 || echo $${p#*:}; done)"; \
	[ -z "$$missing" ] || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; }
	$(PIP) install -e ".[train,serve,dev]"

test: install-test
	python -m pytest
