"""Inference engines for the audio encoders: torch, OpenVINO or ONNX Runtime.

A model hands over a float32 torch module that maps its input arrays to its output arrays (CLAP:
features (B, 1, 1001, 64) -> normalised embeddings; speech emotion: samples (B, T) -> logits and
pooled hidden state) with an example input, and gets back an ``AudioEncoder``: numpy in, numpy out,
batch 1 to batch_max (and, for emotion, any window length) from one conversion.

- ``openvino``: ``openvino.convert_model`` straight from the torch module, saved as IR (float32
  weights); compiled for the CPU with the LATENCY hint. Its precision follows the model's ``dtype``:
  ``auto`` leaves OpenVINO's default (bfloat16 on CPUs with AMX/avx512_bf16, float32 elsewhere),
  ``float32`` makes it float32.
- ``onnxruntime``: ``torch.onnx.export`` (the dynamo exporter; the TorchScript one where that
  fails), run by ONNX Runtime's CPU provider in float32.
- ``torch``: the module as it is (the models keep their own torch path; nothing here).

``engine: auto`` is torch where the model runs on CUDA, otherwise OpenVINO where it is installed
(the fastest measured on CPU: see the README's Benchmark), otherwise torch. An engine that is not
installed, or a conversion that fails, is one WARNING and the model runs on torch.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monitord.inference.engine_cache import cache_root, fingerprint, load_or_convert

log = logging.getLogger(__name__)

ENGINES = ("torch", "openvino", "onnxruntime")
PACKAGE = {"openvino": "openvino", "onnxruntime": "onnxruntime"}
EXTRA = {"openvino": "pip install 'monitord[openvino]'", "onnxruntime": "pip install 'monitord[onnxruntime]'"}
OPENVINO_PRECISION = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


class EngineError(Exception):
    """The engine cannot run this model (not installed, unsupported, conversion failed): use torch."""


@dataclass
class EncoderSpec:
    """What a model hands to an engine."""

    kind: str
    """What the module computes, e.g. "clap-audio" (part of the fingerprint)."""
    module: Any
    """A float32 torch module on the CPU; ``forward(*inputs)`` returns a tensor or a tuple of tensors."""
    example: tuple[Any, ...]
    """Example inputs (torch tensors; batch >= 2 so that no exporter takes batch 1 for a constant)."""
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: tuple[tuple[int, ...], ...]
    """Per input, the axes that may change from call to call (always the batch, axis 0)."""
    model_ref: str
    """Model id or directory: where the converted model is cached."""
    config: dict[str, Any] = field(default_factory=dict)
    """The model's config (goes into the fingerprint)."""


def choose_engine(spec: str, device: str, what: str) -> tuple[str, str]:
    """(engine, why) for a model's ``engine:`` setting on ``device``; a requested engine that cannot
    run here is a WARNING and torch."""
    if spec == "torch":
        return "torch", "configured"
    if spec == "auto":
        if device != "cpu":
            return "torch", f"auto: torch on {device}"
        if _importable("openvino") is None:
            return "openvino", "auto: OpenVINO on the CPU"
        log.info("%s: engine auto runs torch: OpenVINO is not installed (%s; CLAP measured 3x torch float32 on "
                 "an AMX CPU)", what, EXTRA["openvino"])
        return "torch", "auto: OpenVINO not installed"
    if device != "cpu":
        log.warning("%s: engine %s runs on the CPU only; device is %s: running on torch", what, spec, device)
        return "torch", f"{spec} runs on the CPU only"
    missing = _importable(PACKAGE[spec])
    if missing is not None:
        log.warning("%s: engine %s is not installed (%s); running on torch. Install it with %s", what, spec, missing, EXTRA[spec])
        return "torch", f"{spec} not installed"
    return spec, "configured"


def _importable(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return str(exc) or f"no module named {module}"
    return None


class AudioEncoder:
    """A converted encoder: ``encoder(*arrays) -> list of float32 arrays``, one call at a time."""

    engine: str
    precision: str
    """What it computes in, as a torch dtype name (float32, bfloat16, float16)."""
    reason: str
    """Why that precision."""
    folder: Path
    converted: bool
    """Converted by this load (False: reused from the cache)."""

    def __init__(self, engine: str, precision: str, folder: Path, converted: bool):
        self.engine, self.precision, self.folder, self.converted = engine, precision, folder, converted
        self._lock = threading.Lock()

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        with self._lock:
            return self._run([np.ascontiguousarray(x, dtype=np.float32) for x in inputs])

    def _run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def describe(self) -> str:
        return (f"{self.engine} {self.precision} ({self.reason}; {'converted' if self.converted else 'from the cache'}, "
                f"{self.folder})")


class OpenVinoEncoder(AudioEncoder):
    """Compiled for the CPU with the LATENCY hint. ``dtype: auto`` times float32 against bfloat16 on
    the example (where the CPU has bfloat16) and keeps bfloat16 only where it is clearly faster, as
    the torch path does; otherwise the configured precision."""

    def __init__(self, folder: Path, converted: bool, dtype: str, threads: int, example: Sequence[np.ndarray]):
        import openvino as ov

        core = ov.Core()
        # read, not mapped: a cache file truncated or replaced under a running daemon must not SIGBUS it
        core.set_property({"ENABLE_MMAP": False})
        model = core.read_model(folder / "model.xml")
        base: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
        if dtype != "auto":
            self._use(core.compile_model(model, "CPU", {**base, "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[dtype]}))
            self.reason = "configured"
        elif "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            self._use(core.compile_model(model, "CPU", {**base, "INFERENCE_PRECISION_HINT": "f32"}))
            self.reason = "the CPU has no bfloat16"
        else:
            timings = {}
            for hint in ("f32", "bf16"):
                self._use(core.compile_model(model, "CPU", {**base, "INFERENCE_PRECISION_HINT": hint}))
                timings[hint] = _best_of(lambda: self._run(list(example)), 3)
            chosen = "bf16" if timings["bf16"] < 0.85 * timings["f32"] else "f32"
            if chosen == "f32":
                self._use(core.compile_model(model, "CPU", {**base, "INFERENCE_PRECISION_HINT": "f32"}))
            self.reason = f"measured: f32 {timings['f32'] * 1000:.1f} ms, bf16 {timings['bf16'] * 1000:.1f} ms per batch"
        hint = str(self._compiled.get_property("INFERENCE_PRECISION_HINT")).lower()  # "<Type: 'bfloat16'>"
        precision = "bfloat16" if "bf16" in hint or "bfloat16" in hint else \
            "float16" if "f16" in hint or "float16" in hint else "float32"
        if dtype not in ("auto", precision):  # the CPU plugin runs what it can, whatever the hint asked
            self.reason = f"{dtype} configured, {precision} run: the CPU has no {dtype}"
        super().__init__("openvino", precision, folder, converted)

    def _use(self, compiled: Any) -> None:
        self._compiled = compiled
        self._request = compiled.create_infer_request()

    def _run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        results = self._request.infer(inputs)
        # the request's output buffers are reused by the next call: copy
        return [np.array(results[port], dtype=np.float32) for port in self._compiled.outputs]


def _best_of(call: Any, repeats: int) -> float:
    call()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - began)
    return best


class OnnxRuntimeEncoder(AudioEncoder):
    def __init__(self, folder: Path, converted: bool, threads: int, input_names: Sequence[str]):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # from bytes, never mapped from the cache file (see OpenVinoEncoder)
        self._session = ort.InferenceSession((folder / "model.onnx").read_bytes(), options, providers=["CPUExecutionProvider"])
        self._names = list(input_names)
        super().__init__("onnxruntime", "float32", folder, converted)
        self.reason = "float32"

    def _run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(out, dtype=np.float32) for out in self._session.run(None, dict(zip(self._names, inputs)))]


def _versions(engine: str) -> dict[str, str]:
    import torch
    import transformers

    package = importlib.import_module(PACKAGE[engine])
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, engine: package.__version__}
    if engine == "onnxruntime":
        import onnx

        versions["onnx"] = onnx.__version__
    return versions


def _convert_openvino(spec: EncoderSpec, folder: Path) -> None:
    import openvino as ov

    shapes = [ov.PartialShape([-1 if axis in dynamic else size for axis, size in enumerate(example.shape)])
              for example, dynamic in zip(spec.example, spec.dynamic_axes)]
    model = ov.convert_model(spec.module, example_input=spec.example, input=shapes)
    ov.save_model(model, folder / "model.xml", compress_to_fp16=False)


def _convert_onnx(spec: EncoderSpec, folder: Path) -> None:
    """torch.onnx's dynamo exporter; the TorchScript exporter where that fails (both are checked
    against torch after loading)."""
    import torch

    path = folder / "model.onnx"
    dims = tuple({axis: torch.export.Dim(f"{name}_{axis}", min=1, max=1 << 24) for axis in axes}
                 for name, axes in zip(spec.input_names, spec.dynamic_axes))
    try:
        # the exporter prints its steps and its IR passes log every initializer: neither is for a journal
        with contextlib.redirect_stdout(io.StringIO()), _quiet("onnx_ir", "onnxscript", "torch.onnx", "torch.export"):
            torch.onnx.export(spec.module, spec.example, str(path), input_names=list(spec.input_names),
                              output_names=list(spec.output_names), dynamo=True, dynamic_shapes=dims, verbose=False,
                              external_data=False)
        return
    except Exception as exc:  # noqa: BLE001 - the exporter raises anything from torch.export's internals
        log.info("%s: the dynamo ONNX exporter failed (%s); trying the TorchScript exporter", spec.kind, _first_line(exc))
    for leftover in folder.iterdir():
        leftover.unlink()
    axes = {name: {axis: f"{name}_{axis}" for axis in dynamic} for name, dynamic in zip(spec.input_names, spec.dynamic_axes)}
    torch.onnx.export(spec.module, spec.example, str(path), input_names=list(spec.input_names),
                      output_names=list(spec.output_names), dynamo=False, dynamic_axes=axes)


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def load_encoder(spec: EncoderSpec, engine: str, dtype: str, what: str, cache_dir: Path | None = None,
                 threads: int | None = None) -> AudioEncoder:
    """The module on ``engine``, converted once and cached; checked against torch on the example
    (a conversion that computes something else is refused). Raises EngineError."""
    import torch

    threads = threads or torch.get_num_threads()
    try:
        parts = dict(kind=spec.kind, engine=engine, versions=_versions(engine), inputs=list(spec.input_names),
                     outputs=list(spec.output_names), example_shapes=[list(x.shape) for x in spec.example],
                     dynamic_axes=[list(a) for a in spec.dynamic_axes], config=json.dumps(spec.config, sort_keys=True, default=str))
        fp = fingerprint(spec.module, parts)
        root = cache_root(spec.model_ref, cache_dir)
        convert = _convert_openvino if engine == "openvino" else _convert_onnx
        cached = load_or_convert(root, engine, fp, lambda folder: convert(spec, folder), what,
                                 {"kind": spec.kind, "model": spec.model_ref, "versions": parts["versions"]})
        if engine == "openvino":
            encoder: AudioEncoder = OpenVinoEncoder(cached.folder, cached.converted, dtype, threads,
                                                    [x.numpy() for x in spec.example])
        else:
            if dtype not in ("auto", "float32"):
                log.info("%s: onnxruntime runs in float32 (dtype %s applies to torch only)", what, dtype)
            encoder = OnnxRuntimeEncoder(cached.folder, cached.converted, threads, spec.input_names)
        _check(spec, encoder)
    except EngineError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of an optional engine means: run on torch
        raise EngineError(f"{engine}: {_first_line(exc)}") from exc
    return encoder


CHECK_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}
"""Largest |engine - torch| on the example, relative to 1 + max |torch output|, for a conversion to be used."""


def _check(spec: EncoderSpec, encoder: AudioEncoder) -> None:
    import torch

    with torch.inference_mode():
        expected = spec.module(*spec.example)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    got = encoder(*(x.numpy() for x in spec.example))
    for name, want, have in zip(spec.output_names, expected, got):
        want = want.float().numpy()
        if want.shape != have.shape:
            raise EngineError(f"{encoder.engine}: output {name} has shape {have.shape}, torch's {want.shape}")
        error = float(np.abs(want - have).max()) / (1.0 + float(np.abs(want).max()))
        if not error <= CHECK_TOLERANCE[encoder.precision]:
            raise EngineError(f"{encoder.engine}: output {name} differs from torch by {error:.2e} (relative)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def float32_copy(module: Any) -> Any:
    """``module`` itself where it is float32 on the CPU, else a float32 CPU copy (conversion and the
    fingerprint need float32 weights; the benchmark may have moved a shared model to bfloat16)."""
    import copy

    import torch

    tensors = list(module.parameters()) + list(module.buffers())
    if all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors):
        return module
    return copy.deepcopy(module).to("cpu", torch.float32)


def engine_device(config: Any) -> str:
    """Where a model runs: an explicit non-torch engine takes the CPU where ``device`` is auto."""
    from monitord.inference.models.loading import pick_device

    if config.engine in ("openvino", "onnxruntime") and config.device == "auto":
        return "cpu"
    return pick_device(config.device)


def encoder_for(name: str, config: Any, device: str, build: Callable[[], EncoderSpec],
                cache_dir: Path | None = None) -> AudioEncoder | None:
    """The model's encoder on its configured engine; None where it runs on torch (configured, or the
    engine is missing or cannot run this model: a WARNING says why, an INFO line under ``auto``)."""
    what = f"model {name}"
    engine, _ = choose_engine(config.engine, device, what)
    if engine == "torch":
        return None
    try:
        encoder = load_encoder(build(), engine, config.dtype, what, cache_dir)
    except (EngineError, ValueError) as exc:
        level = logging.INFO if config.engine == "auto" else logging.WARNING
        log.log(level, "%s: engine %s cannot run it (%s); running on torch", what, engine, exc)
        return None
    log.info("%s: engine %s", what, encoder.describe())
    return encoder
