"""The test suite's own guards: where CI must provide something, its absence fails instead of skipping."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO, need, require, shared_path, time_scale


def outcome(call) -> type[BaseException]:
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception)) as info:
        call()
    return info.type


@pytest.mark.parametrize("guard", ["shared_path", "need", "require"])
def test_missing_material_fails_under_ci_and_skips_elsewhere(tmp_path, monkeypatch, guard):
    absent = tmp_path / "absent.wav"
    call = {"shared_path": lambda: shared_path(absent), "need": lambda: need(absent.exists(), "absent"),
            "require": lambda: require("monitord_no_such_module", "pip install it")}[guard]
    monkeypatch.setenv("CI", "true")
    assert outcome(call) is pytest.fail.Exception
    monkeypatch.delenv("CI")
    assert outcome(call) is pytest.skip.Exception


@pytest.mark.parametrize("script", sorted((REPO / "bench").glob("*.py")), ids=lambda p: p.name)
def test_every_benchmark_script_imports(script):
    """A benchmark script's imports resolve (bench/gates.py once imported a module that had moved):
    its module body run in a fresh interpreter, as `python bench/X.py` would before main()."""
    load = f"import runpy, sys; sys.path.insert(0, '.'); runpy.run_path({str(script)!r}, run_name='bench_script')"
    out = subprocess.run([sys.executable, "-c", load], cwd=REPO, capture_output=True, text=True, timeout=120 * time_scale())
    assert out.returncode == 0, out.stderr[-2000:]
