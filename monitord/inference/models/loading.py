"""Finding weights: a local directory, or a Hugging Face id (cache or download)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from collections.abc import Callable
from typing import Any

from monitord.inference.models.base import ModelUnavailable

log = logging.getLogger(__name__)

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def is_local(ref: str) -> bool:
    return Path(ref).is_dir()


def load_pretrained(loader: Any, ref: str, what: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(ref)`` with a clear ModelUnavailable when the files are not there.

    A directory is read as it is. An id is looked up in the Hugging Face cache and
    downloaded where the hub is reachable; ``HF_HUB_OFFLINE=1`` makes it cache-only.
    """
    if ref.startswith((".", "/", "~")) and not is_local(ref):
        raise ModelUnavailable(f"{what}: model directory {ref} does not exist.")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return loader.from_pretrained(ref, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(_explain(ref, what, exc)) from None


def _explain(ref: str, what: str, exc: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if is_local(ref):
        return (
            f"{what}: the directory {ref} does not hold a complete {what} checkpoint ({exc}). "
            "It needs the files that save_pretrained writes: config.json, the weights "
            "(model.safetensors) and the processor files (preprocessor_config.json, tokenizer files)."
        )
    where = "the Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the Hugging Face cache or hub"
    return (
        f"{what}: cannot load {ref!r}: it is not a local directory and could not be found in {where}. "
        f"On a machine with internet, `huggingface-cli download {ref} --local-dir DIR` fetches it; "
        f"copy DIR here and set the model's `model:` to that directory (or pre-fill the cache at "
        f"HF_HOME). Underlying error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
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
        self.dtype, self.dtype_reason = choose_dtype(spec, self.device, self._use_dtype, forward)

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
