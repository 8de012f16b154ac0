# Two commands on a fresh Debian/Ubuntu machine (root or sudo):
#   make run [CONFIG=config/monitord.yaml]   set up, then run the daemon
#   make test                                set up, then run the test suite (as CI does)
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= config/monitord.yaml
# torch first and pinned: a bare `torch` requirement pulls a multi-GB CUDA build where none is wanted
TORCH ?= torch==2.13.0
# Home Assistant, only for the tests that check MQTT discovery payloads with its own schemas: in an
# environment of its own (its pins clash with monitord's). 2024.3 is the last release for Python 3.11.
HA_VENV ?= .venv-ha
HA ?= homeassistant==2024.3.*
SYSTEM_PACKAGES := libportaudio2 libasound2-plugins libsndfile1 ffmpeg pulseaudio pulseaudio-utils sox espeak-ng systemd chromium mosquitto

.PHONY: run test setup system-packages ha-env

# exec: the daemon takes the shell's place. make stays its parent and passes a SIGTERM it gets on to
# it, as `timeout` or a process-group kill sends one to both: the daemon takes the second as the same stop.
run: setup
	exec $(VENV)/bin/monitord run -c $(CONFIG)

# Four workers even on two cores: most tests wait on real time (audio played in real time, daemons,
# brokers), not on the CPU. A file's tests stay in one worker (tests/conftest.py).
TEST_WORKERS ?= 4

test: setup ha-env
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup

# May fail (no PyPI, another Python) without touching .venv: the discovery test then skips, citing
# the failure recorded in $(HA_VENV)/.failed (and fails where no install was even tried, under CI).
ha-env: $(HA_VENV)/.installed

$(HA_VENV)/.installed:
	@mkdir -p $(HA_VENV); rm -f $(HA_VENV)/.failed; \
	if (python3 -m venv $(HA_VENV) && $(HA_VENV)/bin/pip install -q "$(HA)") 2>$(HA_VENV)/.pip-errors; then touch $@; \
	else { echo "could not install $(HA) into $(HA_VENV):"; tail -n 20 $(HA_VENV)/.pip-errors; } > $(HA_VENV)/.failed; \
	  echo "warning: could not install $(HA) into $(HA_VENV); the Home Assistant discovery check will not run (see $(HA_VENV)/.failed)"; fi

setup: system-packages $(VENV)/.installed

system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:" $$missing; \
	  sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$sudo apt-get update -q >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q --no-install-recommends $$missing >/dev/null; \
	  case " $$missing " in *" mosquitto "*) \
	    echo "mosquitto is for the tests (they start their own broker): not leaving its system service on"; \
	    $$sudo systemctl disable --now mosquitto >/dev/null 2>&1 || true;; esac; \
	fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@
