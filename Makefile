# Two commands on a fresh Debian/Ubuntu machine (root or sudo):
#   make run [CONFIG=config/monitord.yaml]   set up, then run the daemon
#   make test                                set up, then run the test suite (as CI does)
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= config/monitord.yaml
# torch first and pinned: a bare `torch` requirement pulls a multi-GB CUDA build where none is wanted
TORCH ?= torch==2.13.0
SYSTEM_PACKAGES := libportaudio2 libasound2-plugins libsndfile1 ffmpeg pulseaudio pulseaudio-utils sox espeak-ng systemd chromium

.PHONY: run test setup system-packages

run: setup
	$(VENV)/bin/monitord run -c $(CONFIG)

test: setup
	$(PY) -m pytest

setup: system-packages $(VENV)/.installed

system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:" $$missing; \
	  sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$sudo apt-get update -q >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q --no-install-recommends $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@
