"""`make run` / `make test`'s set-up (setup.sh) as a user sees it: each step named, with about how long
it takes, before it begins; one line per package; a failure names its step. pip, apt, dpkg and
Python's venv are stand-ins on PATH that record what they were asked (the real installs take
minutes: torch, monitord's dependencies, Home Assistant)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

from tests.conftest import REPO, need

def need_tools(test):
    """The test, where make and awk are there (skipped, saying so, elsewhere; failed under CI, which runs make)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        need(shutil.which("make") is not None and shutil.which("awk") is not None, "make and awk are needed")
        return test(*args, **kwargs)
    return run

FAKE_PIP = r"""#!/bin/bash
# a venv's python (or pip): `-m pip install ARGS` as pip says it, noise included; fails on $FAIL_ON
[ "$1" = -m ] && shift 2
echo "RAN: pip $*" >> "$TRANSCRIPT"
echo "Looking in indexes: https://pypi.org/simple"
for a in "$@"; do
  case $a in install|-*|'') continue;; esac
  echo "Requirement already satisfied: packaging in ./lib/python3.11/site-packages (from $a)"
  if [ -n "${FAIL_ON:-}" ] && [[ $a == *$FAIL_ON* ]]; then
    echo "ERROR: No matching distribution found for $a" >&2; exit 1
  fi
  echo "Collecting $a"
  echo "  Downloading ${a%%=*}-1.0-py3-none-any.whl (12.3 MB)"
done
echo "Installing collected packages: dep-a, dep-b"
echo "Successfully installed dep-a-1.0 dep-b-1.0"
"""

FAKES = {
    "python3": r"""#!/bin/bash
echo "RAN: python3 $*" >> "$TRANSCRIPT"
[ "$1 $2" = "-m venv" ] || exit 3
mkdir -p "$3/bin" && cp "$FAKE_PIP" "$3/bin/python" && cp "$FAKE_PIP" "$3/bin/pip" && chmod +x "$3/bin/python" "$3/bin/pip"
""",
    "dpkg": r"""#!/bin/bash
for p in $MISSING; do [ "$2" = "$p" ] && exit 1; done
exit 0
""",
    "apt-get": r"""#!/bin/bash
echo "RAN: apt-get $*" >> "$TRANSCRIPT"
echo "Reading package lists..."
for a in "$@"; do case $a in install|update|-*) ;; *) echo "Get:1 http://deb.debian.org/debian bookworm/main amd64 $a"; echo "Setting up $a (1.0) ...";; esac; done
""",
    "systemctl": '#!/bin/bash\necho "RAN: systemctl $*" >> "$TRANSCRIPT"\n',
    "id": '#!/bin/bash\necho 0\n',
}


def fakes(tmp_path: Path) -> dict[str, str]:
    """PATH with the stand-ins first; TRANSCRIPT: the file the script's output and the stand-ins' RAN lines share."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "fake-pip").write_text(FAKE_PIP)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TRANSCRIPT": str(tmp_path / "transcript"),
            "FAKE_PIP": str(tmp_path / "fake-pip"), "MISSING": ""}


def run(tmp_path: Path, args: list[str], env: dict[str, str], cwd: Path | None = None) -> tuple[int, list[str], str]:
    """(exit status, stdout and RAN lines in the order they happened, stderr)."""
    transcript = Path(env["TRANSCRIPT"])
    with transcript.open("ab") as out:  # O_APPEND, as the stand-ins' >>: one order for both
        done = subprocess.run(args, cwd=cwd or tmp_path, env=env, stdout=out, stderr=subprocess.PIPE, text=True, timeout=120)
    return done.returncode, transcript.read_text().splitlines(), done.stderr


def announced_before(lines: list[str], steps: list[tuple[str, str]]) -> None:
    """Each (announcement, command) in order: the step is said, then its command runs, before the next step is said."""
    said = [i for i, line in enumerate(lines) if line.startswith("setup: ") and line.endswith("...")]
    assert len(said) == len(steps), lines
    for k, (title, command) in enumerate(steps):
        assert title in lines[said[k]], (title, lines)
        ran = [i for i, line in enumerate(lines) if line.startswith("RAN: ") and command in line]
        end = said[k + 1] if k + 1 < len(said) else len(lines)
        assert ran and said[k] < ran[0] < end, (title, command, lines)


@need_tools
def test_the_venv_steps_say_what_they_do_and_how_long_before_they_do_it(tmp_path):
    env = fakes(tmp_path)
    code, lines, err = run(tmp_path, ["bash", str(REPO / "setup.sh"), "venv", ".venv", "torch==2.13.0"], env)
    assert code == 0, err
    announced_before(lines, [
        ("creating the virtual environment .venv (a few seconds)", "python3 -m venv .venv"),
        ("upgrading pip in .venv (a few seconds)", "pip install --upgrade pip"),
        ("installing PyTorch 2.13.0, CPU build (about 2 min)", "pip install torch==2.13.0"),
        ("installing monitord and its test dependencies (about 2 min)", "pip install -e .[test]"),
    ])
    shown = [line for line in lines if not line.startswith("RAN: ")]
    assert "    Collecting torch==2.13.0" in shown and "    installing 2 packages..." in shown  # pip's progress, a line a package
    assert any(line.startswith("      Downloading torch-1.0-py3-none-any.whl (12.3 MB)") for line in shown)
    assert not [line for line in shown if "Requirement already satisfied" in line or "Looking in indexes" in line]
    assert sum(line.startswith("setup: ") and " done in " in line for line in shown) == 4
    assert len(shown) <= 24, shown  # short when nothing goes wrong
    assert (tmp_path / ".venv" / ".installed").is_file()


@need_tools
def test_a_failing_step_is_named_with_the_end_of_its_output(tmp_path):
    env = {**fakes(tmp_path), "FAIL_ON": "torch"}
    code, lines, err = run(tmp_path, ["bash", str(REPO / "setup.sh"), "venv", ".venv", "torch==2.13.0"], env)
    assert code != 0
    assert "setup: FAILED: installing PyTorch 2.13.0, CPU build (exit status 1)" in err, err
    assert "ERROR: No matching distribution found for torch==2.13.0" in err, err
    assert not [line for line in lines if "-e .[test]" in line], lines  # nothing after the failed step
    assert not (tmp_path / ".venv" / ".installed").exists()  # make tries again next time


@need_tools
def test_system_packages_say_which_and_install_only_the_missing(tmp_path):
    env = {**fakes(tmp_path), "MISSING": "sox mosquitto"}
    packages = ["libsndfile1", "sox", "mosquitto"]
    code, lines, err = run(tmp_path, ["bash", str(REPO / "setup.sh"), "system-packages", *packages], env)
    assert code == 0, err
    announced_before(lines, [("updating the package lists (apt-get update) (under a minute)", "apt-get update"),
                             ("installing 2 system packages: sox mosquitto (a few minutes)", "apt-get install -y -q --no-install-recommends sox mosquitto")])
    assert "    Setting up sox (1.0) ..." in lines and "RAN: systemctl disable --now mosquitto" in lines
    env["MISSING"], before = "", len(lines)
    code, lines, err = run(tmp_path, ["bash", str(REPO / "setup.sh"), "system-packages", *packages], env)
    assert code == 0 and lines[before:] == [] and err == ""  # all there: not a word


@need_tools
def test_home_assistant_that_cannot_be_installed_is_a_warning_and_a_record(tmp_path):
    env = {**fakes(tmp_path), "FAIL_ON": "homeassistant"}
    code, lines, err = run(tmp_path, ["bash", str(REPO / "setup.sh"), "ha-env", ".venv-ha", "homeassistant==2024.3.*"], env)
    assert code == 0, err
    announced_before(lines, [("creating .venv-ha for the Home Assistant discovery tests", "python3 -m venv .venv-ha"),
                             ("installing Home Assistant (homeassistant==2024.3.*) into .venv-ha (about 6 min)",
                              "pip install homeassistant==2024.3.*")])
    assert any(line.startswith("setup: warning: could not install homeassistant==2024.3.* into .venv-ha") for line in lines)
    failed = (tmp_path / ".venv-ha" / ".failed").read_text()
    assert "could not install homeassistant==2024.3.* into .venv-ha" in failed and "No matching distribution found" in failed
    assert not (tmp_path / ".venv-ha" / ".installed").exists()


@need_tools
def test_make_sets_up_a_fresh_clone_through_the_script_then_is_quiet(tmp_path):
    """The Makefile's own set-up in a fresh copy of the clone's set-up files: the steps are said as they
    begin; run again, make has nothing to do and says nothing of set-up."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("Makefile", "setup.sh", "pyproject.toml"):
        shutil.copy(REPO / name, clone / name)
    env = fakes(tmp_path)
    code, lines, err = run(tmp_path, ["make", "--no-print-directory", "setup", "ha-env"], env, cwd=clone)
    assert code == 0, err
    said = [line for line in lines if line.startswith("setup: ") and line.endswith("...")]
    assert [s.rsplit(" (", 1)[0] for s in said] == [
        "setup: creating the virtual environment .venv", "setup: upgrading pip in .venv",
        "setup: installing PyTorch 2.13.0, CPU build", "setup: installing monitord and its test dependencies",
        "setup: creating .venv-ha for the Home Assistant discovery tests",
        "setup: installing Home Assistant (homeassistant==2024.3.*) into .venv-ha"], lines
    assert (clone / ".venv" / ".installed").is_file() and (clone / ".venv-ha" / ".installed").is_file()
    before = len(lines)
    code, lines, err = run(tmp_path, ["make", "--no-print-directory", "setup", "ha-env"], env, cwd=clone)
    assert code == 0 and not [line for line in lines[before:] if line.startswith(("setup:", "RAN:"))], lines[before:]
