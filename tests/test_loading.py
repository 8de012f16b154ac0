"""Finding weights: fail fast where the hub cannot be reached, progress lines (not bars) where it can."""

from __future__ import annotations

import logging
import time

import pytest

from monitord.config import ClapModelConfig
from monitord.inference.models import ModelUnavailable
from monitord.inference.models.loading import PROBE_TIMEOUT_S, probe_hub, progress_logger
from tests.conftest import free_port

LABELS = ["tone", "noise"]


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:{port}", "https://no-such-hub.invalid"])
def test_an_uncached_id_fails_fast_when_the_hub_cannot_be_reached(monkeypatch, tmp_path, endpoint):
    """Not offline, but nothing answers: no minutes of retries, and the error says what and how."""
    from monitord.inference.models.clap import ClapZeroShot

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint.format(port=free_port()))
    began = time.monotonic()
    with pytest.raises(ModelUnavailable) as info:
        ClapZeroShot("clap", ClapModelConfig(model="laion/clap-model-that-is-not-cached", labels=LABELS))
    assert time.monotonic() - began < PROBE_TIMEOUT_S + 3
    assert "cannot be reached" in info.value.missing and "not in the Hugging Face cache" in info.value.missing
    assert "hf download laion/clap-model-that-is-not-cached" in info.value.fix


def test_offline_says_so_in_what_is_missing(monkeypatch):
    from monitord.inference.models.clap import ClapZeroShot

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable) as info:
        ClapZeroShot("clap", ClapModelConfig(model="laion/clap-model-that-is-not-cached", labels=LABELS))
    assert "HF_HUB_OFFLINE is set" in info.value.missing and "hf download" in info.value.fix


def test_the_probe_gives_up_within_its_timeout(monkeypatch):
    """A resolver or a connect that hangs costs the probe's timeout, not the system's."""
    import monitord.inference.models.loading as loading

    def hang(*args, **kwargs):
        time.sleep(2.5)
        raise OSError("too late")

    monkeypatch.setattr(loading.socket, "create_connection", hang)
    began = time.monotonic()
    reason = probe_hub("https://huggingface.co", timeout_s=1.0)
    assert reason == "huggingface.co:443: no answer within 1 s" and time.monotonic() - began < 2.0


def test_a_closed_port_fails_the_probe():
    assert "127.0.0.1:" in probe_hub("http://127.0.0.1:%d" % free_port(), timeout_s=1.0)


def test_a_reachable_endpoint_passes_the_probe():
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        assert probe_hub(f"http://127.0.0.1:{server.getsockname()[1]}") is None
    finally:
        server.close()


def test_download_progress_is_log_lines_not_bars(caplog, capsys):
    caplog.set_level(logging.INFO, logger="monitord.inference.models.loading")
    Bar = progress_logger("CLAP model laion/x", every_s=0.0)
    bar = Bar(total=600_000_000, unit="B", unit_scale=True, desc="Downloading bytes")
    for _ in range(6):
        bar.update(100_000_000)
    bar.close()
    files = Bar(total=9, desc="Fetching 9 files")
    files.update(9)
    files.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("CLAP model laion/x: downloading 100.0 of 600.0 MB (17 %)"), lines
    assert any("600.0 of 600.0 MB (100 %)" in line for line in lines) and "9 of 9 files" in lines[-1]
    out = capsys.readouterr()
    assert "\r" not in out.err + out.out and "█" not in out.err + out.out


def test_progress_lines_are_spaced(caplog):
    caplog.set_level(logging.INFO, logger="monitord.inference.models.loading")
    bar = progress_logger("m", every_s=60.0)(total=1000, unit="B")
    for _ in range(999):
        bar.update(1)
    assert len(caplog.records) == 0  # nothing yet: a line every 60 s
    bar.update(1)
    assert len(caplog.records) == 1 and "(100 %)" in caplog.records[0].getMessage()
