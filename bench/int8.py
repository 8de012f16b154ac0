"""int8 post-training quantization (NNCF) of CLAP's audio tower, against the bf16 OpenVINO engine.

    python bench/int8.py [--model DIR] [--windows N] [--rounds R] [--audio DIR]

A measurement, not a feature: nothing here is wired into the daemon's engines.

1. The audio tower is built as monitord builds it (``clap_audio_spec``) and converted to OpenVINO
   IR by the engine's own ``_convert_openvino``; NNCF quantizes that IR (``nncf.quantize``,
   transformer preset) on log-mel features of real recordings (2 s windows at 48 kHz, resampled
   with monitord's ``resample``, features by monitord's ``ClapFeatures``). Half the files calibrate,
   the other half evaluate (held out by file).
2. Accuracy, on a trained tiny CLAP (``--model``; default: the tests' cached one, built and
   trained here if absent), whose probabilities move with the input: zero-shot probabilities
   through the full scoring path (engine audio embeddings, torch text embeddings,
   ``softmax(exp(logit_scale_a) * cos)``) for float32 torch, the bf16 engine and the int8 engine.
3. Speed, on the full-size clap-htsat-unfused architecture with random weights (compute does not
   depend on weight values; its probabilities mean nothing): windows/s of bf16 against int8 at
   batch 8 and 1, in interleaved rounds, medians; resident memory of each engine (a fresh process
   each) and its IR size on disk.

Last line: ``int8_speedup_vs_bf16=X.XX int8_max_prob_diff=Y.YYe-ZZ tolerance=0.02 accepted=yes|no``
(accepted only if the batch-8 speedup is at least 1.15 and the tiny model's largest probability
difference to float32 torch is at most the tolerance).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monitord.audio import read_mono, resample
from monitord.inference.engines import OpenVinoEncoder, _convert_openvino
from monitord.inference.models.clap_features import ClapFeatures
from monitord.inference.models.encoders import clap_audio_spec
from monitord.tools.mixing import DEFAULT_AUDIO

RATE = 48000
WINDOW = 2 * RATE
HOP = RATE  # 1 s between calibration / evaluation windows
LABELS = ("tone", "noise", "speech", "music")  # what the tiny test CLAP was trained on
PROMPT = "This is a sound of {label}."  # monitord's default prompt
TOLERANCE = 0.02
MIN_SPEEDUP = 1.15
HINT = "bfloat16"  # both engines: what the daemon asks for; the CPU plugin falls back to f32 without bf16
TESTS_CACHE = Path.home() / ".cache" / "monitord-tests"


# ---------------------------------------------------------------- real recordings

def recordings(audio_dir: Path) -> list[Path]:
    paths = sorted(audio_dir.glob("*/*.wav"))
    if not paths:
        sys.exit(f"int8: no recordings under {audio_dir}/*/*.wav: nothing to calibrate on (pass --audio DIR)")
    return paths


def split_by_file(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(calibration files, evaluation files): alternate files of the sorted list, so both halves
    span the categories and no file gives windows to both."""
    return paths[0::2], paths[1::2]


def windows_of(paths: list[Path]) -> np.ndarray:
    """(N, 96000) float32: 2 s windows at 48 kHz, 1 s apart, from each file."""
    windows = []
    for path in paths:
        samples, rate = read_mono(path)
        samples = resample(samples, rate, RATE)
        if len(samples) < WINDOW:
            samples = np.pad(samples, (0, WINDOW - len(samples)))
        windows += [samples[s : s + WINDOW] for s in range(0, len(samples) - WINDOW + 1, HOP)]
    return np.stack(windows).astype(np.float32)


def under_a_tone(windows: np.ndarray, ratios_db=(-55, -50, -45, -40, -35), seed: int = 0) -> np.ndarray:
    """Each window scaled to ``ratio`` dB (RMS) below a -15 dBFS tone of 300-3000 Hz, for every ratio:
    the tiny CLAP (a tone-or-noise detector) calls a recording "noise" with p ~ 1 and a tone "tone"
    with p ~ 1; across these ratios its probabilities cross from one to the other, where an error in
    the embeddings shows most."""
    rng = np.random.default_rng(seed)
    t = np.arange(windows.shape[1]) / RATE
    level = 10 ** (-15 / 20)
    rms = np.sqrt((windows.astype(np.float64) ** 2).mean(axis=1, keepdims=True)) + 1e-12
    mixes = []
    for ratio in ratios_db:
        tones = np.sqrt(2) * level * np.sin(2 * np.pi * rng.uniform(300, 3000, size=(len(windows), 1)) * t)
        mixes.append(windows / rms * level * 10 ** (ratio / 20) + tones)
    return np.concatenate(mixes).astype(np.float32)


def features_of(extractor, windows: np.ndarray, batch: int = 8) -> np.ndarray:
    """(N, 1, frames, mels) float32 log-mel features, as monitord computes them."""
    compute = ClapFeatures(extractor, "cpu")
    return np.concatenate([compute(windows[i : i + batch])[0].numpy() for i in range(0, len(windows), batch)])


# ---------------------------------------------------------------- models and conversions

def tiny_model_dir(requested: str | None) -> Path:
    """The trained tiny CLAP: ``--model``, else the tests' cached copy, else trained here."""
    if requested:
        return Path(requested)
    cached = sorted(p for p in TESTS_CACHE.glob("tiny-clap-*") if p.is_dir() and (p / "config.json").exists())
    if cached:
        return cached[-1]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.tiny_models import build_clap, train_clap

    folder = Path(tempfile.mkdtemp(prefix="int8-tiny-clap-"))
    print(f"no cached tiny CLAP under {TESTS_CACHE}: training one in {folder}")
    return train_clap(build_clap(folder))


def load_clap(folder: Path):
    from transformers import ClapModel, ClapProcessor

    from monitord.inference.models.loading import load_pretrained

    return (load_pretrained(ClapModel, str(folder), "CLAP model").eval(),
            load_pretrained(ClapProcessor, str(folder), "CLAP processor"))


def audio_spec(model, processor, model_ref: str):
    extractor = processor.feature_extractor
    frames = ClapFeatures(extractor, "cpu").frames
    return clap_audio_spec(model.audio_model, model.audio_projection, model.config, model_ref, frames,
                           int(extractor.feature_size))


def convert_float_ir(spec, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _convert_openvino(spec, folder)  # the engine's own conversion: float32 IR
    return folder


@dataclass
class QuantizeReport:
    seconds: float
    warnings: list[str]
    quantized_ops: int
    float_ops: list[str]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def quantize_ir(float_dir: Path, int8_dir: Path, calibration: np.ndarray) -> QuantizeReport:
    """NNCF static int8 quantization of the float IR, calibrated on ``calibration`` features one
    window at a time; saved as ``int8_dir/model.xml``."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(float_dir / "model.xml")
    dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    collect = _Collect()
    logging.getLogger("nncf").addHandler(collect)
    began = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(calibration))
    seconds = time.perf_counter() - began
    logging.getLogger("nncf").removeHandler(collect)
    int8_dir.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, int8_dir / "model.xml", compress_to_fp16=False)
    quantized_ops, float_ops = weighted_ops(quantized)
    return QuantizeReport(seconds, collect.lines + [f"{w.category.__name__}: {w.message}" for w in caught],
                          quantized_ops, float_ops)


def weighted_ops(model) -> tuple[int, list[str]]:
    """(MatMul/Convolution ops whose every input is int8: a FakeQuantize'd activation or an int8
    weight constant, the others as "name <- input ops")."""
    quantized, left = 0, []
    for op in model.get_ordered_ops():
        if op.get_type_name() not in ("MatMul", "Convolution"):
            continue
        sources = [op.input_value(i).get_node() for i in range(op.get_input_size())]
        if all(_is_int8(source) for source in sources):
            quantized += 1
        else:
            left.append(f"{op.get_type_name()} {op.get_friendly_name()} <- {'/'.join(s.get_type_name() for s in sources)}")
    return quantized, left


def _is_int8(node) -> bool:
    """A FakeQuantize, or an int8 weight decompressed on the fly (i8 Constant -> Convert [-> Subtract] -> Multiply)."""
    while node.get_type_name() in ("Multiply", "Subtract", "Convert"):
        node = node.input_value(0).get_node()
    return node.get_type_name() == "FakeQuantize" or (
        node.get_type_name() == "Constant" and node.get_element_type().get_type_name() in ("i8", "u8"))


def summarise_float_ops(float_ops: list[str]) -> list[str]:
    """Activation x activation matmuls of attention grouped; anything else by name."""
    attention = [line for line in float_ops if "aten::matmul" in line]
    other = [line for line in float_ops if "aten::matmul" not in line]
    return ([f"{len(attention)} attention matmuls (Q.K^T, softmax.V): activation x activation"] if attention else []) + other


def compile_engine(folder: Path, example: np.ndarray) -> OpenVinoEncoder:
    """The IR compiled as the daemon compiles it (LATENCY hint, threads, precision hint)."""
    import torch

    return OpenVinoEncoder(folder, True, HINT, torch.get_num_threads(), [example])


def ir_megabytes(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".xml", ".bin")) / 1e6


# ---------------------------------------------------------------- accuracy

def text_embeddings(model, processor):
    import torch

    tokens = processor.tokenizer([PROMPT.format(label=label) for label in LABELS], padding=True, truncation=True,
                                 return_tensors="pt")
    with torch.inference_mode():
        return model.get_text_features(**tokens).pooler_output.float()


def probabilities(embeddings: np.ndarray, text, logit_scale: float) -> np.ndarray:
    import torch

    return (logit_scale * torch.from_numpy(embeddings) @ text.T).softmax(dim=-1).numpy()


def embed_torch(module, features: np.ndarray, batch: int = 8) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return np.concatenate([module(torch.from_numpy(features[i : i + batch])).numpy()
                               for i in range(0, len(features), batch)])


def embed_engine(engine: OpenVinoEncoder, features: np.ndarray, batch: int = 8) -> np.ndarray:
    return np.concatenate([engine(features[i : i + batch])[0] for i in range(0, len(features), batch)])


def prob_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    diff = np.abs(a - b).ravel()
    return float(diff.max()), float(np.percentile(diff, 99))


def compare_probabilities(model, processor, spec, engines: dict, features: np.ndarray) -> dict[str, np.ndarray]:
    """Zero-shot probabilities of every window for float32 torch and each engine."""
    text = text_embeddings(model, processor)
    scale = float(model.logit_scale_a.detach().exp())
    probs = {"float32 torch": probabilities(embed_torch(spec.module, features), text, scale)}
    for name, engine in engines.items():
        probs[name] = probabilities(embed_engine(engine, features), text, scale)
    return probs


def print_accuracy(title: str, probs: dict[str, np.ndarray]) -> float:
    """Prints max / p99 |Δprob| of each engine against float32 torch and int8 against bf16; returns
    int8's max against float32."""
    reference = probs["float32 torch"]
    spread = reference.max(axis=0) - reference.min(axis=0)
    print(f"\n{title}: {len(reference)} held-out windows, labels {LABELS}")
    print(f"  float32 probabilities move between windows by up to {spread.max():.3f} "
          f"(per label max-min: {', '.join(f'{s:.3f}' for s in spread)})")
    for name in ("bf16", "int8"):
        worst, p99 = prob_diff(probs[name], reference)
        print(f"  {name:5s} vs float32 torch: max |dprob| {worst:.2e}, p99 {p99:.2e}")
    worst, p99 = prob_diff(probs["int8"], probs["bf16"])
    print(f"  int8  vs bf16 engine:    max |dprob| {worst:.2e}, p99 {p99:.2e}")
    agree = float(np.mean(probs["int8"].argmax(1) == reference.argmax(1)))
    print(f"  int8 top label = float32 top label on {agree:.0%} of windows")
    return prob_diff(probs["int8"], reference)[0]


# ---------------------------------------------------------------- speed and memory

def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def windows_per_second(engine: OpenVinoEncoder, features: np.ndarray, batch: int, windows: int) -> float:
    calls = max(1, windows // batch)
    began = time.perf_counter()
    for i in range(calls):
        start = (i * batch) % (len(features) - batch + 1)
        engine(features[start : start + batch])
    return calls * batch / (time.perf_counter() - began)


def interleaved_rounds(engines: dict, features: np.ndarray, batch: int, windows: int, rounds: int) -> dict[str, list[float]]:
    """bf16, int8, bf16, int8, ...: each round times every engine once on the same windows."""
    for engine in engines.values():
        engine(features[:batch])  # warm-up
    speeds: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            speeds[name].append(windows_per_second(engine, features, batch, windows))
    return speeds


RSS_CHILD = """
import sys, numpy as np, openvino as ov
def status(key): return next(float(l.split()[1]) / 1e3 for l in open('/proc/self/status') if l.startswith(key))
def rss(): return status('VmRSS:')
core = ov.Core(); core.set_property({'ENABLE_MMAP': False})
before = rss()
compiled = core.compile_model(core.read_model(sys.argv[1]), 'CPU', {'PERFORMANCE_HINT': 'LATENCY',
    'INFERENCE_NUM_THREADS': int(sys.argv[3]), 'INFERENCE_PRECISION_HINT': sys.argv[2]})
compiled.create_infer_request().infer([np.zeros((8, 1, 1001, 64), np.float32)])
print(before, rss(), status('VmHWM:'))
"""


def engine_rss(folder: Path) -> tuple[float, float, float]:
    """(MB after importing openvino, MB after compiling and one batch of 8, peak MB) in a fresh process."""
    import torch

    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(folder / "model.xml"), "bf16", str(torch.get_num_threads())],
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1]), float(out[2])


# ---------------------------------------------------------------- the two models

def tiny_accuracy(model_dir: Path, calibration_windows: np.ndarray, evaluation_windows: np.ndarray, scratch: Path) -> float:
    model, processor = load_clap(model_dir)
    spec = audio_spec(model, processor, str(model_dir))
    calibration = features_of(processor.feature_extractor, calibration_windows)
    evaluation = features_of(processor.feature_extractor, evaluation_windows)
    float_dir = convert_float_ir(spec, scratch / "tiny-float")
    report = quantize_ir(float_dir, scratch / "tiny-int8", calibration)
    print(f"\ntiny CLAP {model_dir}: quantized in {report.seconds:.1f} s, {report.quantized_ops} MatMul/Convolution "
          f"int8, {len(report.float_ops)} left in float")
    engines = {"bf16": compile_engine(float_dir, evaluation[:2]), "int8": compile_engine(scratch / "tiny-int8", evaluation[:2])}
    as_recorded = print_accuracy("accuracy, trained tiny CLAP, held-out recordings",
                                 compare_probabilities(model, processor, spec, engines, evaluation))
    mixed = features_of(processor.feature_extractor, under_a_tone(evaluation_windows))
    under_tone = print_accuracy("accuracy, trained tiny CLAP, held-out recordings 55-35 dB under a tone",
                                compare_probabilities(model, processor, spec, engines, mixed))
    return max(as_recorded, under_tone)


def full_size(calibration_windows: np.ndarray, evaluation_windows: np.ndarray, scratch: Path, windows: int,
              rounds: int) -> float:
    """Speed (and, for what it is worth, random-weight probabilities) of the full-size architecture;
    returns int8's batch-8 speedup over bf16 (ratio of medians)."""
    from monitord.tools.bench import build_model

    model, processor = build_model(None, "cpu")
    spec = audio_spec(model, processor, "clap-htsat-unfused (random weights)")
    calibration = features_of(processor.feature_extractor, calibration_windows)
    evaluation = features_of(processor.feature_extractor, evaluation_windows)
    began = time.perf_counter()
    float_dir = convert_float_ir(spec, scratch / "full-float")
    print(f"\nfull-size audio tower converted in {time.perf_counter() - began:.1f} s")
    report = quantize_ir(float_dir, scratch / "full-int8", calibration)
    print(f"full-size: quantized in {report.seconds:.1f} s on {len(calibration)} windows, {report.quantized_ops} "
          f"MatMul/Convolution int8, {len(report.float_ops)} left in float:")
    for line in summarise_float_ops(report.float_ops):
        print(f"    {line}")
    for line in dict.fromkeys(report.warnings):
        print(f"  NNCF warning: {line}")
    engines = {"bf16": compile_engine(float_dir, evaluation[:2]), "int8": compile_engine(scratch / "full-int8", evaluation[:2])}
    for name, engine in engines.items():
        print(f"  {name} engine: {engine.precision} ({engine.reason})")

    probs = compare_probabilities(model, processor, spec, engines, evaluation)
    print_accuracy("full-size, RANDOM weights (probabilities mean nothing: speed side only)", probs)

    print(f"\nspeed, full-size, {rounds} interleaved rounds of {windows} windows, load before: {loadavg()}")
    medians = {}
    for batch in (8, 1):
        speeds = interleaved_rounds(engines, evaluation, batch, windows if batch == 8 else max(8, windows // 4), rounds)
        medians[batch] = {name: statistics.median(v) for name, v in speeds.items()}
        for name, values in speeds.items():
            print(f"  batch {batch} {name}: median {medians[batch][name]:.2f} windows/s "
                  f"(rounds: {', '.join(f'{v:.2f}' for v in values)})")
        print(f"  batch {batch} int8/bf16: {medians[batch]['int8'] / medians[batch]['bf16']:.2f}  (load now {loadavg()})")
    del engines, model
    print("\nmemory (fresh process each, bf16 hint, one batch of 8) and IR size:")
    for name, folder in (("bf16", float_dir), ("int8", scratch / "full-int8")):
        base, after, peak = engine_rss(folder)
        print(f"  {name}: RSS {after:.0f} MB ({after - base:.0f} MB over openvino's import), peak {peak:.0f} MB, "
              f"IR {ir_megabytes(folder):.1f} MB")
    return medians[8]["int8"] / medians[8]["bf16"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="trained tiny CLAP for accuracy (default: the tests' cached one)")
    parser.add_argument("--windows", type=int, default=32, help="windows per engine per round (batch 8)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--audio", type=Path, default=DEFAULT_AUDIO, help="real recordings, DIR/*/*.wav")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(trace|is_gradient_checkpointing).*")  # torch tracing noise

    calibration_files, evaluation_files = split_by_file(recordings(args.audio))
    calibration_windows, evaluation_windows = windows_of(calibration_files), windows_of(evaluation_files)
    print(f"calibration: {len(calibration_windows)} windows from {len(calibration_files)} files; "
          f"evaluation: {len(evaluation_windows)} windows from {len(evaluation_files)} other files")
    import openvino as ov

    print(f"CPU capabilities (OpenVINO): {ov.Core().get_property('CPU', 'OPTIMIZATION_CAPABILITIES')}")
    with tempfile.TemporaryDirectory(prefix="int8-bench-") as scratch:
        max_diff = tiny_accuracy(tiny_model_dir(args.model), calibration_windows, evaluation_windows, Path(scratch))
        speedup = full_size(calibration_windows, evaluation_windows, Path(scratch), args.windows, args.rounds)
    accepted = speedup >= MIN_SPEEDUP and max_diff <= TOLERANCE
    print(f"int8_speedup_vs_bf16={speedup:.2f} int8_max_prob_diff={max_diff:.2e} tolerance={TOLERANCE} "
          f"accepted={'yes' if accepted else 'no'}")


if __name__ == "__main__":
    main()
