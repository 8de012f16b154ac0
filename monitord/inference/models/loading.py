"""Finding weights: a local directory, or a Hugging Face id (cache or download).

An id is looked up in the Hugging Face cache first. Where it is not there: with ``HF_HUB_OFFLINE``
set, or when the hub cannot be reached (a DNS lookup and a TCP connect, a few seconds at most),
loading fails at once with a ``ModelUnavailable`` that says what is missing and the command that
fixes it, instead of retrying for minutes. Where the hub answers, the files are downloaded with
progress written as log lines (a journal gets lines, not progress bars).
"""

from __future__ import annotations

import bisect
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from monitord.inference.models.base import ModelUnavailable

log = logging.getLogger(__name__)

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

PROBE_TIMEOUT_S = 3.0
"""How long the hub gets to answer a DNS lookup and a TCP connect before it counts as unreachable."""
PROGRESS_EVERY_S = 5.0
"""Seconds between two download progress lines."""
WEIGHT_FILES = ("*.json", "*.txt", "*.model", "*.safetensors")
"""What from_pretrained reads (config, processor, tokenizer, weights); .bin only where no .safetensors."""


def is_local(ref: str) -> bool:
    return Path(ref).is_dir()


def hub_offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hf_command() -> str:
    """The hub's CLI as the user can run it: the ``hf`` installed beside this Python (``.venv/bin/hf``,
    which is on no PATH unless the venv is activated), by a path that works from the current
    directory; plain ``hf`` where there is none."""
    beside = Path(sys.executable).parent / "hf"
    if not beside.is_file():
        return "hf"
    here = Path.cwd()
    if here != Path(here.anchor) and beside.is_relative_to(here):  # from a clone: .venv/bin/hf
        return str(beside.relative_to(here))
    return str(beside)


def fetch_command(ref: str) -> str:
    return f"{hf_command()} download {ref}"


def probe_hub(endpoint: str | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the hub (or the HTTPS proxy in front of it) accepts a TCP connection within
    ``timeout_s``; otherwise why not. The DNS lookup runs in a thread, so a resolver that hangs
    costs ``timeout_s``, not its own minutes."""
    url = urlsplit(endpoint or hub_endpoint())
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") if url.scheme == "https" else \
        os.environ.get("HTTP_PROXY") or os.environ.get("http_proxy")
    target = urlsplit(proxy if "://" in (proxy or "") else f"http://{proxy}") if proxy else url
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    result: list[str | None] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                result.append(None)
        except OSError as exc:
            result.append(f"{host}:{port}: {exc.strerror or exc}")

    thread = threading.Thread(target=attempt, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    if not result:
        return f"{host}:{port}: no answer within {timeout_s:g} s"
    return result[0]


def hub_cache() -> Path:
    """The Hugging Face hub cache as huggingface_hub (and so transformers) reads it: HF_HUB_CACHE,
    else HF_HOME/hub, else XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub (its
    ``constants``, a few milliseconds to import; torch and transformers are not imported)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def in_hub_cache(ref: str) -> bool:
    """Whether the cache holds a snapshot of hub id ``ref`` (``models--ORG--NAME/snapshots/*``):
    it may then load from there (whether the snapshot is complete, from_pretrained finds out)."""
    snapshots = hub_cache() / ("models--" + ref.replace("/", "--")) / "snapshots"
    try:
        return any(entry.is_dir() for entry in snapshots.iterdir())
    except OSError:
        return False


def check_available(ref: str, what: str, probe: bool = True) -> None:
    """Raise the ModelUnavailable that ``load_pretrained`` would, where it is sure without torch or
    transformers: a directory that does not exist, or an id not in the Hugging Face cache with
    ``HF_HUB_OFFLINE`` set (or, with ``probe``, the hub unreachable). Returns where the files are or
    may be fetched: the load itself then decides."""
    if ref.startswith((".", "/", "~")) and not is_local(ref):
        raise _no_directory(ref, what)
    if is_local(ref) or in_hub_cache(ref):
        return
    underlying = f"no snapshot of {ref} in {hub_cache()}"
    if hub_offline():
        raise _offline(ref, what, underlying)
    if probe and (unreachable := probe_hub()) is not None:
        raise _unreachable(ref, what, unreachable)


def _no_directory(ref: str, what: str) -> ModelUnavailable:
    return ModelUnavailable(f"{what}: model directory {ref} does not exist.", missing=f"the directory {ref}",
                            fix=f"{fetch_command('<model id>')} --local-dir {ref}")


def _offline(ref: str, what: str, underlying: Exception | str) -> ModelUnavailable:
    return ModelUnavailable(_explain(ref, what, underlying), missing=f"{ref} is not in the Hugging Face cache "
                            "and HF_HUB_OFFLINE is set", fix=_fix(ref))


def _unreachable(ref: str, what: str, unreachable: str) -> ModelUnavailable:
    log.debug("%s: %s is not in the Hugging Face cache and the hub cannot be reached (%s)", what, ref, unreachable)
    return ModelUnavailable(
        f"{what}: cannot load {ref!r}: it is not in the Hugging Face cache and the hub ({hub_endpoint()}) "
        f"cannot be reached ({unreachable}). {_fix(ref)}",
        missing=f"{ref} is not in the Hugging Face cache and {hub_endpoint()} cannot be reached ({unreachable})",
        fix=_fix(ref))


def load_pretrained(loader: Any, ref: str, what: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(ref)`` with a clear ModelUnavailable when the files are not there.

    A directory is read as it is. An id is read from the Hugging Face cache, or downloaded (with
    progress lines) where the hub can be reached; ``HF_HUB_OFFLINE=1`` makes it cache-only.
    """
    if ref.startswith((".", "/", "~")) and not is_local(ref):
        raise _no_directory(ref, what)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if is_local(ref):
        try:
            return in_memory(loader.from_pretrained(ref, **kwargs))
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(_explain(ref, what, exc), missing=f"a complete checkpoint in {ref}",
                                   fix=f"{fetch_command('<model id>')} --local-dir {ref}") from None
    try:
        return in_memory(loader.from_pretrained(ref, local_files_only=True, **kwargs))
    except (OSError, ValueError) as exc:
        cache_error = exc
    if hub_offline():
        raise _offline(ref, what, cache_error) from None
    unreachable = probe_hub()
    if unreachable is not None:
        raise _unreachable(ref, what, unreachable) from None
    try:
        folder = download(ref, what)
    except Exception as exc:  # noqa: BLE001 - huggingface_hub's network errors (httpx) are not OSError
        raise ModelUnavailable(_explain(ref, what, exc), missing=f"{ref} could not be downloaded ({_first_line(exc)})",
                               fix=_fix(ref)) from None
    try:
        return in_memory(loader.from_pretrained(folder, **kwargs))
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(_explain(ref, what, exc), missing=f"{ref} could not be downloaded ({_first_line(exc)})",
                               fix=_fix(ref)) from None


def in_memory(loaded: Any) -> Any:
    """``loaded`` (what from_pretrained returned), its weights copied out of the files they were
    read from. transformers maps ``model.safetensors`` into memory and its tensors point into that
    mapping: a file truncated or rewritten under a running process (an administrator copying new
    weights over the folder) would change the weights or kill the process with SIGBUS."""
    if hasattr(loaded, "named_parameters") and hasattr(loaded, "modules"):
        copied = own_memory(loaded)
        log.debug("%s: %d tensors copied out of their weights file", type(loaded).__name__, copied)
    return loaded


def own_memory(module: Any) -> int:
    """Give every CPU tensor of a torch module that points into a file mapping memory of its own
    (where /proc/self/maps cannot be read: every CPU tensor). Tied weights stay tied: a parameter
    is one object wherever it is used, and its data is replaced in place. Returns how many were copied."""
    import torch

    in_file = _file_mapped()
    copied = 0
    with torch.no_grad():
        for param in module.parameters():
            if in_file(param.data):
                param.data = param.data.clone()
                copied += 1
        clones: dict[int, Any] = {}
        for owner in module.modules():
            for name, buffer in list(owner._buffers.items()):
                if buffer is not None and in_file(buffer):
                    if id(buffer) not in clones:
                        clones[id(buffer)] = buffer.clone()
                        copied += 1
                    owner._buffers[name] = clones[id(buffer)]
    return copied


def _file_mapped() -> Callable[[Any], bool]:
    """A test: does this tensor's memory lie in a mapping of a file (this process's, as it is now)?"""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return lambda tensor: tensor.device.type == "cpu"
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)  # address perms offset dev inode path
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
            low, high = fields[0].split("-")
            ranges.append((int(low, 16), int(high, 16)))
    ranges.sort()
    starts = [low for low, _ in ranges]

    def test(tensor: Any) -> bool:
        if tensor.device.type != "cpu" or tensor.untyped_storage().nbytes() == 0:
            return False
        address = tensor.untyped_storage().data_ptr()
        i = bisect.bisect_right(starts, address) - 1
        return i >= 0 and address < ranges[i][1]

    return test




def download(ref: str, what: str) -> str:
    """Fetch a hub repository's checkpoint files into the cache, logging progress every few seconds."""
    from huggingface_hub import HfApi, snapshot_download

    endpoint = hub_endpoint()
    files = HfApi(endpoint=endpoint).list_repo_files(ref)
    patterns = list(WEIGHT_FILES) + ([] if any(f.endswith(".safetensors") for f in files) else ["*.bin"])
    log.info("%s: downloading %s from %s into the Hugging Face cache", what, ref, endpoint)
    began = time.monotonic()
    folder = snapshot_download(ref, allow_patterns=patterns, endpoint=endpoint,
                               tqdm_class=progress_logger(f"{what} {ref}", every_s=PROGRESS_EVERY_S))
    log.info("%s: %s downloaded in %.0f s", what, ref, time.monotonic() - began)
    return folder


def progress_logger(what: str, every_s: float = PROGRESS_EVERY_S, logger: logging.Logger = log) -> type:
    """A tqdm class that writes no bar but a log line every ``every_s`` seconds (and one at the end):
    ``CLAP model x: downloading 312.4 of 615.2 MB (51 %), 12.3 MB/s``."""
    from tqdm.auto import tqdm

    class LogProgress(tqdm):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs["disable"] = False
            kwargs["file"] = _Discard()
            kwargs.setdefault("mininterval", every_s)
            desc = str(kwargs.get("desc") or "")
            super().__init__(*args, **kwargs)
            self._began = self._logged = time.monotonic()
            self._done_logged = False
            self._silent = desc.startswith("Reconstruct")  # huggingface_hub's second bar over the same bytes

        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            now = time.monotonic()
            finished = bool(self.total) and self.n >= self.total
            if self._silent:
                return shown
            if (now - self._logged >= every_s and self.n) or (finished and not self._done_logged):
                self._logged = now
                self._done_logged = finished
                logger.info("%s: %s", what, self.describe(now))
            return shown

        def describe(self, now: float) -> str:
            elapsed = max(now - self._began, 1e-6)
            if self.unit == "B":
                mb, total = self.n / 1e6, (self.total or 0) / 1e6
                share = f" ({100 * self.n / self.total:.0f} %)" if self.total else ""
                return (f"downloading {mb:.1f}" + (f" of {total:.1f}" if total else "") +
                        f" MB{share}, {mb / elapsed:.1f} MB/s")
            return f"{self.n:g} of {self.total:g} files" if self.total else f"{self.n:g} files"

        def display(self, *args: Any, **kwargs: Any) -> None:  # no bar, ever
            return None

    return LogProgress


class _Discard:
    def write(self, text: str) -> None:
        return None

    def flush(self) -> None:
        return None


def _fix(ref: str) -> str:
    return (f"on a machine that reaches the hub, `{fetch_command(ref)}` (then copy HF_HOME's hub cache here), or "
            f"`{fetch_command(ref)} --local-dir DIR` and set the model's `model:` to DIR")


def _first_line(exc: Exception | str) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _explain(ref: str, what: str, exc: Exception | str) -> str:
    if is_local(ref):
        return (
            f"{what}: the directory {ref} does not hold a complete {what} checkpoint ({exc}). "
            "It needs the files that save_pretrained writes: config.json, the weights "
            "(model.safetensors) and the processor files (preprocessor_config.json, tokenizer files)."
        )
    where = "the Hugging Face cache (HF_HUB_OFFLINE is set)" if hub_offline() else "the Hugging Face cache or hub"
    return (
        f"{what}: cannot load {ref!r}: it is not a local directory and could not be found in {where}. "
        f"On a machine with internet, `{fetch_command(ref)} --local-dir DIR` fetches it; "
        f"copy DIR here and set the model's `model:` to that directory (or pre-fill the cache at "
        f"HF_HOME). Underlying error: {_first_line(exc)}"
    )


def pick_device(spec: str) -> str:
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ModelUnavailable(f"device {spec!r} was asked for, but torch sees no CUDA device")
    return spec



def choose_dtype(spec: str, device: str, use: Callable[[Any], None], forward: Callable[[], None]) -> tuple[Any, str]:
    """The dtype to run in, and why: as configured; on CUDA bfloat16 (float16 without it); on CPU
    bfloat16 only where a timing shows it faster (it pays only with AMX/avx512_bf16, and some
    architectures, WavLM for one, run slower in it). ``use(dtype)`` converts the model,
    ``forward()`` runs one small batch; the model is left in the chosen dtype."""
    import time

    import torch

    if spec != "auto":
        chosen, reason = getattr(torch, spec), "configured"
    elif device.startswith("cuda"):
        chosen = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        reason = "CUDA with bfloat16" if chosen == torch.bfloat16 else "CUDA without bfloat16"
    else:
        timings = {}
        for dtype in (torch.float32, torch.bfloat16):
            use(dtype)
            try:
                forward()  # warm-up
                best = float("inf")
                for _ in range(3):
                    began = time.perf_counter()
                    forward()
                    best = min(best, time.perf_counter() - began)
            except RuntimeError:  # a CPU build without bfloat16 kernels
                best = float("inf")
            timings[dtype] = best
        chosen = torch.bfloat16 if timings[torch.bfloat16] < 0.85 * timings[torch.float32] else torch.float32
        reason = f"measured: float32 {timings[torch.float32] * 1000:.1f} ms, bfloat16 {timings[torch.bfloat16] * 1000:.1f} ms per batch"
    use(chosen)
    return chosen, reason


class TorchPlacement:
    """What the torch models share: the dtype to run in (chosen by timing where it is "auto"), and the
    move to the CPU in float32 after repeated failures on an accelerator. A model lists its modules
    (``torch_modules``) and moves its other tensors in ``_moved_to_cpu``."""

    device: str
    dtype: Any
    dtype_reason: str

    def torch_modules(self) -> list[Any]:
        raise NotImplementedError

    def _moved_to_cpu(self) -> None:
        """Tensors that are not in ``torch_modules`` (cached embeddings, index tensors) follow here."""

    def place(self, spec: str, forward: Callable[[], None]) -> None:
        import torch

        timed = spec == "auto" and not self.device.startswith("cuda")
        # timing bfloat16 rounds the weights: keep the float32 ones to put back if float32 wins
        originals = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in self.torch_modules()] if timed else []
        self.dtype, self.dtype_reason = choose_dtype(spec, self.device, self._use_dtype, forward)
        if self.dtype == torch.float32:
            for module, state in zip(self.torch_modules(), originals):
                module.load_state_dict(state)

    def _use_dtype(self, dtype: Any) -> None:
        self.dtype = dtype
        for module in self.torch_modules():
            module.to(dtype)

    def fall_back_to_cpu(self) -> None:
        import torch

        self.device, self.dtype, self.dtype_reason = "cpu", torch.float32, "fallback from GPU"
        for module in self.torch_modules():
            module.to("cpu", torch.float32)
        self._moved_to_cpu()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
