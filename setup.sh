#!/usr/bin/env bash
# The set-up behind `make run` and `make test` (the Makefile calls it; run it on its own the same way):
#   setup.sh system-packages PACKAGE...   apt-get install those not installed yet (root, or sudo)
#   setup.sh venv VENV TORCH              VENV with PyTorch (the TORCH requirement) and monitord[test]
#   setup.sh ha-env HA_VENV HA            HA_VENV with Home Assistant (HA) for the MQTT discovery tests;
#                                         where it fails, a warning and HA_VENV/.failed (exit 0)
# Each step says what it does and about how long it takes before it begins, then one line per
# package as pip or apt gets to it; the rest of their output goes to a log, whose end is shown,
# with the step's name, where a step fails. PYTHON (default python3) makes the environments.
set -uo pipefail

PYTHON=${PYTHON:-python3}

# progress: the lines of pip's and apt's output that say which package they are at
progress() {
  awk '/^(Collecting|Processing|Obtaining) / || /^ +Downloading / || /^Setting up / { print "    " $0; fflush(); next }
       /^Installing collected packages: / { n = split(substr($0, 32), names, ", ");
                                             print "    installing " n " package" (n == 1 ? "" : "s") "..."; fflush() }'
}

# step TITLE ABOUT COMMAND...: say TITLE (ABOUT: how long it takes), run COMMAND with its progress
# lines shown, and its time when it is done; where it fails, name the step and show its log's end
step() {
  local title=$1 about=$2 log status began=$SECONDS
  shift 2
  log=$(mktemp "${TMPDIR:-/tmp}/monitord-setup.XXXXXX")
  echo "setup: $title ($about)..."
  "$@" 2>&1 | tee "$log" | progress
  status=${PIPESTATUS[0]}
  if [ "$status" -ne 0 ]; then
    { echo "setup: FAILED: $title (exit status $status); the last lines of its output (all of it: $log):"
      tail -n 25 "$log" | sed 's/^/    /'; } >&2
    return "$status"
  fi
  rm -f "$log"
  echo "setup: $title: done in $((SECONDS - began)) s"
}

# "torch==2.13.0" -> "PyTorch 2.13.0"; another requirement as it is written
torch_name() {
  case $1 in torch==*) echo "PyTorch ${1#torch==}";; *) echo "PyTorch ($1)";; esac
}

system_packages() {
  local missing=() sudo=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  step "updating the package lists (apt-get update)" "under a minute" "${sudo[@]}" apt-get update -q || return
  step "installing ${#missing[@]} system packages: ${missing[*]}" "a few minutes" \
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" || return
  case " ${missing[*]} " in *" mosquitto "*)
    echo "setup: mosquitto is for the tests (they start their own broker): not leaving its system service on"
    "${sudo[@]}" systemctl disable --now mosquitto >/dev/null 2>&1 || true;; esac
}

venv() {
  local venv=$1 torch=$2
  rm -f "$venv/.installed"
  step "creating the virtual environment $venv" "a few seconds" "$PYTHON" -m venv "$venv" || return
  step "upgrading pip in $venv" "a few seconds" "$venv/bin/python" -m pip install --upgrade pip || return
  step "installing $(torch_name "$torch"), CPU build" "about 2 min" "$venv/bin/python" -m pip install "$torch" || return
  step "installing monitord and its test dependencies" "about 2 min" "$venv/bin/python" -m pip install -e ".[test]" || return
  touch "$venv/.installed"
}

ha_env() {
  local venv=$1 ha=$2
  mkdir -p "$venv"
  rm -f "$venv/.failed" "$venv/.installed"
  if step "creating $venv for the Home Assistant discovery tests" "a few seconds" "$PYTHON" -m venv "$venv" 2>"$venv/.pip-errors" &&
     step "installing Home Assistant ($ha) into $venv" "about 6 min" "$venv/bin/pip" install "$ha" 2>"$venv/.pip-errors"; then
    rm -f "$venv/.pip-errors"
    touch "$venv/.installed"
  else
    { echo "could not install $ha into $venv:"; cat "$venv/.pip-errors"; } >"$venv/.failed"
    echo "setup: warning: could not install $ha into $venv; the Home Assistant discovery check will not run (see $venv/.failed)"
  fi
}

what=${1:-}
shift || true
case $what in
  system-packages) system_packages "$@";;
  venv) [ $# -eq 2 ] || { echo "usage: $0 venv VENV TORCH" >&2; exit 2; }; venv "$@";;
  ha-env) [ $# -eq 2 ] || { echo "usage: $0 ha-env HA_VENV HA" >&2; exit 2; }; ha_env "$@";;
  *) echo "usage: $0 system-packages PACKAGE... | venv VENV TORCH | ha-env HA_VENV HA" >&2; exit 2;;
esac
