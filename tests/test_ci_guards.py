"""The test suite's own guards: where CI must provide something, its absence fails instead of skipping."""

from __future__ import annotations

import pytest

from tests.conftest import need, shared_path


def outcome(call) -> type[BaseException]:
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception)) as info:
        call()
    return info.type


@pytest.mark.parametrize("guard", ["shared_path", "need"])
def test_missing_material_fails_under_ci_and_skips_elsewhere(tmp_path, monkeypatch, guard):
    absent = tmp_path / "absent.wav"
    call = (lambda: shared_path(absent)) if guard == "shared_path" else (lambda: need(absent.exists(), "absent"))
    monkeypatch.setenv("CI", "true")
    assert outcome(call) is pytest.fail.Exception
    monkeypatch.delenv("CI")
    assert outcome(call) is pytest.skip.Exception
