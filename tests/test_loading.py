"""Finding weights: fail fast where the hub cannot be reached, progress lines (not bars) where it can."""

from __future__ import annotations

import json
import logging
import time

import pytest

from monitord.config import ClapModelConfig
from monitord.inference.models import ModelUnavailable
from monitord.inference.models.loading import PROBE_TIMEOUT_S, probe_hub, progress_logger
from tests.conftest import free_port, need, time_scale

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
    assert time.monotonic() - began < PROBE_TIMEOUT_S + 3 * time_scale()  # the probe gives up; the import takes its time
    assert "cannot be reached" in info.value.missing and "not in the Hugging Face cache" in info.value.missing
    assert "hf download laion/clap-model-that-is-not-cached" in info.value.fix


def test_offline_says_so_in_what_is_missing(monkeypatch):
    from monitord.inference.models.clap import ClapZeroShot

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable) as info:
        ClapZeroShot("clap", ClapModelConfig(model="laion/clap-model-that-is-not-cached", labels=LABELS))
    assert "HF_HUB_OFFLINE is set" in info.value.missing and "hf download" in info.value.fix


def test_the_fix_names_the_hf_the_venv_has(monkeypatch, tmp_path):
    """`hf` is installed in .venv/bin, on no PATH: the fix says `.venv/bin/hf download ...` (from the
    clone), the full path (from elsewhere), and plain `hf` only where there is none beside Python."""
    import shutil
    import subprocess
    import sys

    from monitord.inference.models.clap import ClapZeroShot
    from monitord.inference.models.loading import fetch_command, hf_command

    bin_dir = tmp_path / "clone" / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "hf").write_text("#!/bin/sh\n")
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.chdir(tmp_path / "clone")
    assert fetch_command("laion/x") == ".venv/bin/hf download laion/x"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable) as info:
        ClapZeroShot("clap", ClapModelConfig(model="laion/clap-model-that-is-not-cached", labels=LABELS))
    assert "`.venv/bin/hf download laion/clap-model-that-is-not-cached`" in info.value.fix
    monkeypatch.chdir("/")
    assert fetch_command("laion/x") == f"{bin_dir / 'hf'} download laion/x"
    (bin_dir / "hf").unlink()
    assert fetch_command("laion/x") == "hf download laion/x"
    monkeypatch.undo()
    named = hf_command()  # this test run's own: it runs, from here, PATH or not
    need(named != "hf" or shutil.which("hf") is not None,  # it comes with huggingface_hub (transformers)
         "huggingface_hub's hf is not installed beside this Python nor on PATH")
    out = subprocess.run([named, "download", "--help"], capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and "download" in out.stdout, out.stderr


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


class FakeHub:
    """Enough of the Hugging Face hub's HTTP API for one repository, served from a local folder:
    revision info, the file tree, and the files (HEAD and GET, in small timed chunks so a download
    takes a few seconds)."""

    def __init__(self, repo: str, folder, seconds: float = 2.5):
        import hashlib
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.repo, self.sha = repo, "0123456789abcdef0123456789abcdef01234567"
        self.files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        self.files["pytorch_model.bin"] = b"\0" * 1000  # a duplicate format: must not be fetched
        self.requests: list[str] = []
        total = sum(len(v) for v in self.files.values())
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                return None

            def _json(self, data) -> None:
                body = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file(self, head: bool) -> None:
                name = self.path.split("/resolve/", 1)[1].split("/", 1)[1].split("?")[0]
                data = hub.files.get(name)
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", hub.sha)
                self.send_header("ETag", '"' + hashlib.sha1(data).hexdigest() + '"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if head:
                    return
                step = max(1, len(data) // 20)
                for i in range(0, len(data), step):  # the whole checkpoint takes ``seconds``
                    self.wfile.write(data[i : i + step])
                    self.wfile.flush()
                    time.sleep(seconds * len(data[i : i + step]) / total)

            def do_HEAD(self) -> None:  # noqa: N802
                hub.requests.append("HEAD " + self.path)
                self._file(head=True)

            def do_GET(self) -> None:  # noqa: N802
                hub.requests.append("GET " + self.path)
                if self.path.startswith(f"/api/models/{hub.repo}/revision/"):
                    self._json({"id": hub.repo, "sha": hub.sha, "siblings": [{"rfilename": n} for n in hub.files]})
                elif self.path.startswith(f"/api/models/{hub.repo}/tree/"):
                    self._json([{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                                for n, d in hub.files.items()])
                elif "/resolve/" in self.path:
                    self._file(head=False)
                else:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_first_download_logs_progress_lines_and_the_model_loads(tiny_clap, tmp_path, monkeypatch, caplog):
    """A hub id that is not cached, with a hub that answers: downloaded once, with progress lines in
    the log while it runs, then loaded; the second time it comes from the cache, with no request."""
    import monitord.inference.models.loading as loading
    from monitord.inference.models.clap import ClapZeroShot

    hub = FakeHub("laion/tiny-test-clap", tiny_clap)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read at import; the tests set it
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 8192)  # a 250 KB model in many steps, as 600 MB in 10 MB ones
    monkeypatch.setattr(loading, "PROGRESS_EVERY_S", 0.5)
    caplog.set_level(logging.INFO, logger="monitord.inference.models.loading")
    try:
        model = ClapZeroShot("clap", ClapModelConfig(model="laion/tiny-test-clap", labels=LABELS, dtype="float32"))
        assert model.model_id == "laion/tiny-test-clap" and model.labels == tuple(LABELS)
        lines = [r.getMessage() for r in caplog.records]
        progress = [line for line in lines if "downloading" in line and "MB" in line]
        under_way = [line for line in progress if "(100 %)" not in line]
        assert len(under_way) >= 2, lines  # lines while it ran, so a long download does not look like a hang
        assert any("(100 %)" in line for line in progress), progress
        assert not any("pytorch_model.bin" in r for r in hub.requests if r.startswith("GET"))
        caplog.clear()
        hub.requests.clear()
        ClapZeroShot("clap", ClapModelConfig(model="laion/tiny-test-clap", labels=LABELS, dtype="float32"))
        assert hub.requests == [] and not [r for r in caplog.records if "downloading" in r.getMessage()]
    finally:
        hub.close()


def test_timing_bfloat16_leaves_no_rounding_in_weights_that_stay_float32():
    """dtype auto on the CPU times bfloat16 by converting the model; where float32 wins, the weights
    must be the float32 ones loaded, not their bfloat16 rounding converted back."""
    import torch

    from monitord.inference.models.loading import TorchPlacement

    class Placed(TorchPlacement):
        def __init__(self):
            self.device = "cpu"
            self.layer = torch.nn.Linear(64, 64)
            torch.nn.init.normal_(self.layer.weight)

        def torch_modules(self):
            return [self.layer]

    placed = Placed()
    loaded = placed.layer.weight.detach().clone()
    assert not torch.equal(loaded.to(torch.bfloat16).float(), loaded)  # bfloat16 would round these

    def forward():  # bfloat16 made to lose the timing: float32 is chosen
        if placed.layer.weight.dtype == torch.bfloat16:
            time.sleep(0.02)
        placed.layer(torch.zeros(1, 64, dtype=placed.layer.weight.dtype))

    placed.place("auto", forward)
    assert placed.dtype == torch.float32 and placed.layer.weight.dtype == torch.float32
    assert torch.equal(placed.layer.weight, loaded)
