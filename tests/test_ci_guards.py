"""The test suite's own guards: where CI must provide something, its absence fails instead of skipping."""

from __future__ import annotations

import pytest

from tests.conftest import need, require, shared_path


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
