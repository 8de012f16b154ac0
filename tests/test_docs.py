"""The README is a front page that tells the truth, and the documentation site builds strictly.

- README.md is at most 300 lines;
- its two set-up commands are what the Makefile and CI run (`make -n`: a dry run, nothing installed);
- the five-minute tour's commands run as written: every line of its `sh` blocks, in order, with
  `.venv/bin/` read as this interpreter's folder, `/tmp/` as a temporary folder and its loopback
  ports as free ones. A `monitord run` without `--until-done` is the daemon the tour leaves running:
  it runs in the background until the next `monitord run` or the tour's end, then Ctrl-C (SIGINT)
  must stop it with status 0. A command that cannot run here says why in a trailing comment
  `# not run by the tests: REASON`, and is reported as skipped with that reason;
- `mkdocs build --strict` passes, and fails on a broken link or anchor, or a page left out of nav.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, need, require

README = REPO / "README.md"
MAX_LINES = 300
TOUR_HEADING = "## A five-minute tour"
NOT_RUN = re.compile(r"#\s*not run by the tests:\s*(?P<reason>.+)$")
BIN = Path(sys.executable).parent


def front_page_problems(text: str) -> list[str]:
    lines = text.splitlines()
    return [f"README.md is {len(lines)} lines; a front page has at most {MAX_LINES}: move the detail to docs/"] \
        if len(lines) > MAX_LINES else []


def section(text: str, heading: str) -> str:
    start = text.index(heading + "\n")
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end >= 0 else len(text)]


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```$", text, flags=re.S | re.M)


def commands(block: str) -> list[str]:
    """A block's commands: one per line, a here-document kept with the line that opens it."""
    out, lines = [], block.splitlines()
    while lines:
        line = lines.pop(0)
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        heredoc = re.search(r"<<-?\s*'?\"?(\w+)", line)
        if heredoc:
            end = heredoc.group(1)
            body = []
            while lines and lines[0] != end:
                body.append(lines.pop(0))
            assert lines, f"here-document {end!r} never ends: {line}"
            line = "\n".join([line, *body, lines.pop(0)])
        out.append(line)
    return out


def tour_commands() -> list[str]:
    return [c for block in sh_blocks(section(README.read_text(), TOUR_HEADING)) for c in commands(block)]


def is_daemon(command: str) -> bool:
    return bool(re.search(r"\bmonitord run\b", command)) and "--until-done" not in command


def make_dry_run(*args: str) -> list[str]:
    """`make -n -B ...`: every recipe line make would run, as if nothing were set up yet; runs none."""
    need(shutil.which("make") is not None, "make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in {"VENV", "CONFIG", "TORCH", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    out = subprocess.run(["make", "-n", "-B", *args], cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


# the front page


def test_the_readme_is_a_front_page_of_at_most_300_lines():
    assert not front_page_problems(README.read_text())
    assert front_page_problems("line\n" * (MAX_LINES + 1)) and not front_page_problems("line\n" * MAX_LINES)


def test_the_readme_s_set_up_commands_are_what_make_and_ci_run():
    readme = README.read_text()
    block = next(b for b in sh_blocks(section(readme, "## Two commands")))
    said = {line.split("#")[0].strip(): line.split("#", 1)[1] for line in block.splitlines() if line.strip()}
    assert set(said) == {"make run", "make test"}, said
    assert "runs: monitord run -c config/monitord.yaml" in said["make run"]
    assert "builds the docs" in said["make test"] and "test suite" in said["make test"] and "what CI runs" in said["make test"]

    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == "make test", f".ci/run should end by running the README's `make test`, not {ci[-1]!r}"

    run = make_dry_run("run")
    # exec: the daemon itself gets make's signals
    assert run[-1].removeprefix("exec ") == ".venv/bin/monitord run -c config/monitord.yaml", run[-1]
    assert make_dry_run("run", "CONFIG=other.yaml")[-1].removeprefix("exec ") == ".venv/bin/monitord run -c other.yaml"
    test = make_dry_run("test")
    assert re.fullmatch(r"(\S+=\S+ )*\.venv/bin/python -m mkdocs build --strict --site-dir build/\S+", test[-2]), test[-2]
    assert test[-1].startswith(".venv/bin/python -m pytest"), test[-1]
    setup = (REPO / "setup.sh").read_text()  # each set-up step the recipes run is setup.sh's
    for recipe in (run, test):  # "installs what it needs"
        assert any("setup.sh system-packages" in line for line in recipe), "system packages"
        assert any(re.search(r"setup.sh venv \S*\.venv", line) for line in recipe), "this package, with its extras"
    assert "apt-get install" in setup and re.search(r'pip install -e "\.\[test\]"', setup)
    assert any("setup.sh ha-env" in line and ".venv-ha" in line and "homeassistant" in line for line in test)


# the five-minute tour, run as written


def test_the_tour_runs_as_written(tmp_path):
    need(shutil.which("sox") is not None, "sox is not installed (make run and make test install it)")
    tour = tour_commands()
    for needed in ("monitord classify", "monitord check-config", "monitord run", "monitord tail", "monitord teach"):
        assert any(needed in c for c in tour), f"the tour no longer has `{needed}`: {tour}"
    ports = {port: str(free_port()) for port in re.findall(r"127\.0\.0\.1:(\d+)", "\n".join(tour))}

    def local(command: str) -> str:
        command = command.replace(".venv/bin/", f"{BIN}/").replace("/tmp/", f"{tmp_path}/")
        return re.sub(r"127\.0\.0\.1:(\d+)", lambda m: f"127.0.0.1:{ports[m.group(1)]}", command)

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "XDG_STATE_HOME": str(tmp_path / "state")}
    daemon, daemon_log, ran, outputs = None, tmp_path / "daemon.log", [], {}

    def stop_daemon() -> None:
        nonlocal daemon
        os.killpg(daemon.pid, signal.SIGINT)  # Ctrl-C
        try:
            code = daemon.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            raise AssertionError(f"the tour's daemon did not stop on Ctrl-C: {daemon_log.read_text()[-3000:]}")
        assert code == 0, f"the tour's daemon exited {code} on Ctrl-C: {daemon_log.read_text()[-3000:]}"
        daemon = None

    try:
        for command in tour:
            if NOT_RUN.search(command.splitlines()[0]):
                continue  # reported by test_every_tour_command_is_run_or_says_why
            if daemon is not None and re.search(r"\bmonitord run\b", command):
                stop_daemon()
            if is_daemon(command):
                with daemon_log.open("w") as log:
                    daemon = subprocess.Popen(["bash", "-c", local(command)], cwd=REPO, env=env, stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True)
                deadline = time.monotonic() + 120
                while "monitord running" not in daemon_log.read_text():
                    assert daemon.poll() is None, f"`{command}` exited {daemon.returncode}: {daemon_log.read_text()[-3000:]}"
                    assert time.monotonic() < deadline, f"`{command}` did not start: {daemon_log.read_text()[-3000:]}"
                    time.sleep(0.2)
                ran.append(command)
                continue
            out = subprocess.run(["bash", "-c", local(command)], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
            assert out.returncode == 0, f"`{command}` exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
            outputs[command] = out.stdout
            ran.append(command)
        if daemon is not None:
            stop_daemon()
    finally:
        if daemon is not None and daemon.poll() is None:
            os.killpg(daemon.pid, signal.SIGKILL)

    # what the tour says happens, happened
    tail = next(out for c, out in outputs.items() if "monitord tail" in c)
    assert re.search(r"^#2 .* alert kitchen alarm onset 'alarm'", tail, re.M) and " offset " in tail, tail
    events = [json.loads(line) for line in (tmp_path / "monitord-tour" / "events.jsonl").read_text().splitlines()]
    onsets = [e for e in events if e["kind"] == "alert" and e["phase"] == "onset"]
    assert [e["seq"] for e in onsets] == [2], "one alarm, seq 2 (what `teach --from-event 2` takes)"
    assert any(e["kind"] == "status" and e["status"] == "suppressed" and e["seq"] > 2 for e in events), \
        "run again after `not this`: a `suppressed` status, no alert"
    assert "not:alarm" in next(out for c, out in outputs.items() if "--list" in c)


@pytest.mark.parametrize("command", [c for c in tour_commands() if re.search(r"(^|[\s/])monitord\s", c)], ids=lambda c: c.split("#")[0].replace("/tmp/monitord-tour/", "").replace(".venv/bin/", "").strip()[:90])
def test_every_tour_command_is_run_or_says_why(command):
    """Each monitord command of the tour is run by test_the_tour_runs_as_written, or skipped here with its reason."""
    reason = NOT_RUN.search(command.splitlines()[0])
    if reason:
        pytest.skip(f"the tour's `{command.split('#')[0].strip()}` is not run: {reason.group('reason')}")
    assert ".venv/bin/monitord" in command, "the tour runs the checkout's own command line: .venv/bin/monitord"


# the documentation site


def mkdocs_build(folder: Path, site: Path) -> subprocess.CompletedProcess:
    require("mkdocs", "pip install -e '.[docs]'")
    require("material", "pip install -e '.[docs]'")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=folder,
                          capture_output=True, text=True, timeout=180, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def test_the_documentation_site_builds_strictly(tmp_path):
    out = mkdocs_build(REPO, tmp_path / "site")
    assert out.returncode == 0, out.stderr[-4000:]
    index = (tmp_path / "site" / "index.html").read_text()
    assert "A five-minute tour" in index and 'src="dashboard.png"' in index, "the site's front page is the README"
    assert (tmp_path / "site" / "dashboard.png").stat().st_size < 300_000
    nav = (REPO / "mkdocs.yml").read_text()
    pages = sorted(p.name for p in (REPO / "docs").glob("*.md"))
    assert all(re.search(rf":\s*{re.escape(p)}$", nav, re.M) for p in pages), "every page in nav"


def docs_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copy(REPO / "mkdocs.yml", copy)
    shutil.copy(README, copy)
    shutil.copytree(REPO / "docs", copy / "docs")
    return copy


@pytest.mark.parametrize("breakage, says", [
    (lambda c: (c / "docs" / "gate.md").open("a").write("\nSee [the alerts](alerts-page.md).\n"), "alerts-page.md"),
    (lambda c: (c / "docs" / "gate.md").open("a").write("\nSee [onsets](alerts.md#no-such-heading).\n"), "no-such-heading"),
    (lambda c: (c / "README.md").write_text(README.read_text() + "\n[teaching](docs/teach.md)\n"), "teach.md"),
    (lambda c: (c / "docs" / "orphan.md").write_text("# Orphan\n"), "orphan.md"),
], ids=["broken link", "broken anchor", "broken link in the README", "page left out of nav"])
def test_a_broken_link_or_a_page_left_out_of_nav_fails_the_build(tmp_path, breakage, says):
    copy = docs_copy(tmp_path)
    assert mkdocs_build(copy, tmp_path / "site").returncode == 0
    breakage(copy)
    out = mkdocs_build(copy, tmp_path / "site")
    assert out.returncode != 0 and says in out.stderr, out.stderr[-3000:]
