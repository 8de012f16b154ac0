# Two commands on a fresh Debian/Ubuntu machine (root or sudo):
#   make run [CONFIG=config/monitord.yaml]   set up, then run the daemon
#   make test                                set up, build the docs strictly, then run the test suite (as CI does)
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
# brokers), not on the CPU. A file's tests stay in one worker (--dist loadfile), so its module
# fixtures are built once (xdist's loadgroup does not group on pytest 9: every test became its own
# unit); files that must not run together take a lock (tests/conftest.py). A worker that crashes
# ends the run at once, naming the test it ran: once xdist has replaced a crashed worker it either
# hangs or fails with an INTERNALERROR naming no test.
TEST_WORKERS ?= 4

# The documentation site first (mkdocs.yml): strict, so a broken link or anchor, or a page left out
# of its nav, fails here; build/ is not tracked.
test: setup ha-env
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir build/site
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --max-worker-restart=0 --durations=15

# Each set-up step is setup.sh's: it says what it does and about how long it takes, and shows one
# line per package. Home Assistant may fail (no PyPI, another Python) without touching .venv: the
# discovery test then skips, citing the failure recorded in $(HA_VENV)/.failed (and fails where no
# install was even tried, under CI).
ha-env: $(HA_VENV)/.installed

$(HA_VENV)/.installed:
	@bash setup.sh ha-env "$(HA_VENV)" "$(HA)"

setup: system-packages $(VENV)/.installed

system-packages:
	@bash setup.sh system-packages $(SYSTEM_PACKAGES)

$(VENV)/.installed: pyproject.toml
	@bash setup.sh venv "$(VENV)" "$(TORCH)"
