"""What frame-level emotion scores cost over window-level ones, on a full-size architecture.

    python bench/frames.py [--arch wav2vec2|hubert|wavlm] [--batch 8] [--rounds 7]

Random weights with the default config of the architecture (wav2vec2-base, HuBERT-base,
WavLM-base: 12 layers, hidden 768, 99 frames per 2 s), float32 on CPU. The same weights are
scored through ``EmotionClassifier.score`` with ``granularity: window`` and ``granularity: frame``
on the same batch of 2 s windows at 16 kHz, alternating each round; the medians of wall and
process CPU time, their ratio and the median of each round's ratio are printed (CPU time and
paired ratios are less sensitive to other load on the machine; ``--control`` adds a second
window-level copy to show how far two identical paths differ).
Frame scores add the classifier over every frame, a softmax and the mapping onto
nine emotions: expect a few per cent at most.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

LABELS = ("ang", "hap", "neu", "sad", "fea", "dis", "sur", "calm")


def build(arch: str):
    import torch
    from transformers import (HubertConfig, HubertForSequenceClassification, Wav2Vec2Config, Wav2Vec2FeatureExtractor,
                              Wav2Vec2ForSequenceClassification, WavLMConfig, WavLMForSequenceClassification)

    config_cls, model_cls = {
        "wav2vec2": (Wav2Vec2Config, Wav2Vec2ForSequenceClassification),
        "hubert": (HubertConfig, HubertForSequenceClassification),
        "wavlm": (WavLMConfig, WavLMForSequenceClassification),
    }[arch]
    torch.manual_seed(0)
    config = config_cls(num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id={v: k for k, v in enumerate(LABELS)})
    model = model_cls(config).eval()
    return model, Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True, return_attention_mask=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="wav2vec2", choices=["wav2vec2", "hubert", "wavlm"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--control", action="store_true",
                        help="also a second window-level copy: how far two identical paths differ on this machine")
    args = parser.parse_args()

    import torch

    from monitord.config import EmotionModelConfig, GateConfig, WindowConfig
    from monitord.inference.models.emotion import EmotionClassifier
    from monitord.windowing.tiling import ModelInput, WindowCutter

    model, extractor = build(args.arch)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    classifiers = {}
    for name in ("window", "frame", "window-2") if args.control else ("window", "frame"):
        config = EmotionModelConfig(kind="emotion", model=f"random-{args.arch}", device="cpu", dtype="float32",
                                    granularity=name.split("-")[0])
        classifiers[name] = EmotionClassifier("emo", config, model=copy.deepcopy(model), extractor=extractor)
    rng = np.random.default_rng(0)
    cutter = WindowCutter("s", 16000, WindowConfig(), GateConfig(mode="always"), {"emo": ModelInput(16000)})
    windows = [cutter.cut((0.05 * rng.standard_normal(32000)).astype(np.float32), 8000 * i, 0.0, 0.0) for i in range(args.batch)]
    for c in classifiers.values():  # warm-up
        c.score(windows)
    wall: dict[str, list[float]] = {g: [] for g in classifiers}
    cpu: dict[str, list[float]] = {g: [] for g in classifiers}
    for r in range(args.rounds):
        order = list(classifiers) if r % 2 == 0 else list(reversed(classifiers))
        for g in order:
            began, began_cpu = time.perf_counter(), time.process_time()
            classifiers[g].score(windows)
            wall[g].append(time.perf_counter() - began)
            cpu[g].append(time.process_time() - began_cpu)
    extra = _extra_work(classifiers["frame"], windows, args.rounds * 10)
    print(f"{args.arch} ({params:.1f} M parameters, random weights), batch {args.batch} x 2 s at 16 kHz, float32, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    for what, timings in (("wall", wall), ("cpu", cpu)):
        for g in classifiers:
            t = timings[g]
            print(f"  {what:<4} {g:<8}  median {statistics.median(t):.3f} s  (min {min(t):.3f}, max {max(t):.3f})")
        for g in (g for g in classifiers if g != "window"):
            paired = statistics.median(a / b for a, b in zip(timings[g], timings["window"]))
            ratio = statistics.median(timings[g]) / statistics.median(timings["window"])
            print(f"  {what:<4} {g} / window: {ratio:.3f} of the medians, {paired:.3f} the median of the rounds' ratios "
                  f"({(paired - 1) * 100:+.1f} %)")
    window = statistics.median(cpu["window"])
    print(f"  the frame work alone (classifier over every frame, softmax, nine emotions, per-window arrays): "
          f"{extra * 1000:.2f} ms per batch = {extra / window * 100:.2f} % of the window median (cpu)")


def _extra_work(classifier, windows, repeats: int) -> float:
    """Median time of what frame scoring adds after the forward pass, on the batch's real projector output."""
    import torch

    audio = np.stack([w.at_rate(16000) for w in windows])
    inputs = classifier.extractor(list(audio), sampling_rate=16000, return_tensors="pt", return_attention_mask=False)
    with torch.inference_mode():
        classifier.model(inputs["input_values"])
    projected = classifier._tap._taken
    times = []
    for _ in range(repeats):
        classifier._tap._taken = projected
        began = time.process_time()
        with torch.inference_mode():
            frames = classifier._tap.logits().softmax(dim=-1)
        classifier._frame_scores(windows, frames)
        times.append(time.process_time() - began)
    return statistics.median(times)


if __name__ == "__main__":
    main()
