"""Tiny random-weight checkpoints built offline, saved with save_pretrained.

They exercise the real loading and inference code (same classes, same processors as the
full-size checkpoints) in a fraction of a second. Their scores mean nothing about sound.

    python -m tests.tiny_models DIR     # writes DIR/clap and DIR/emotion, for trying the daemon without a hub
"""

from __future__ import annotations

import sys
from pathlib import Path

def build_tokenizer(folder: Path):
    from monitord.inference.models.offline import train_roberta_tokenizer

    return train_roberta_tokenizer(folder)


def build_clap(folder: Path, seed: int = 0) -> Path:
    """A ~40 k-parameter ClapModel + ClapProcessor (unfused layout: rand_trunc, repeatpad)."""
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    import tempfile

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = build_tokenizer(Path(scratch))
    config = ClapConfig(
        projection_dim=16,
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=66, projection_dim=16,
        ),
        audio_config=dict(
            patch_embeds_hidden_size=8, depths=[1, 1], num_attention_heads=[1, 2], hidden_size=16, projection_dim=16,
        ),
    )
    torch.manual_seed(seed)
    model = ClapModel(config).eval()
    # LAION's published preprocessor settings for the unfused checkpoints
    extractor = ClapFeatureExtractor(truncation="rand_trunc", padding="repeatpad", frequency_min=50, frequency_max=14000)
    processor = ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


TRAIN_LABELS = ("tone", "noise", "speech", "music")


def _training_clips(rate: int = 48000, seconds: float = 2.0):
    """Tones (300 Hz - 3 kHz, -30 to -6 dBFS) labelled tone, white or brown noise labelled noise;
    half of them fill the window, half are a 0.3-1.5 s burst in silence, as windows at an edge are."""
    import numpy as np

    rng = np.random.default_rng(1)
    n = int(rate * seconds)
    t = np.arange(n) / rate
    clips, targets = [], []
    for i in range(12):
        freq = 300.0 * (10 ** ((i % 8) / 7))
        level = 10 ** (rng.uniform(-30, -6) / 20)
        tone = level * np.sqrt(2) * np.sin(2 * np.pi * freq * t + rng.uniform(0, 6))
        noise = rng.standard_normal(n)
        if i % 2:
            noise = np.cumsum(noise)
            noise -= np.convolve(noise, np.ones(64) / 64, mode="same")
        noise *= level / noise.std()
        for signal, target in ((tone, 0), (noise, 1)):
            if i >= 6:  # a burst somewhere in the window
                length = int(rate * rng.uniform(0.3, 1.5))
                begin = int(rng.integers(0, n - length))
                mask = np.zeros(n)
                mask[begin : begin + length] = 1.0
                signal = signal * mask
            clips.append(signal.astype(np.float32))
            targets.append(target)
    return clips, targets


def train_clap(folder: Path, steps: int = 60) -> Path:
    """Teach a saved tiny CLAP to tell tones ("tone") from noise ("noise"), then save it again.

    A few seconds of CPU: enough for tests to check that events fire where the tone is in a
    file and nowhere else, which a random model cannot show.
    """
    import torch
    from transformers import ClapModel, ClapProcessor

    processor = ClapProcessor.from_pretrained(str(folder))
    model = ClapModel.from_pretrained(str(folder)).train()
    clips, targets = _training_clips()
    feats = torch.cat([processor.feature_extractor([c], sampling_rate=48000, return_tensors="pt")["input_features"] for c in clips])
    is_longer = torch.zeros(len(clips), 1, dtype=torch.bool)
    tokens = processor.tokenizer([f"This is a sound of {label}." for label in TRAIN_LABELS], padding=True, return_tensors="pt")
    target = torch.tensor(targets)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(steps):
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], input_features=feats, is_longer=is_longer)
        loss = torch.nn.functional.cross_entropy(out.logits_per_audio, target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval().save_pretrained(folder)
    return folder


CHECKPOINT_EMOTIONS = ("ang", "hap", "neu", "sad", "fea", "dis", "sur", "calm", "whisper")


def build_emotion(folder: Path, seed: int = 0, kind: str = "wav2vec2") -> Path:
    """A tiny wav2vec2 (or WavLM) speech-emotion classifier with IEMOCAP/RAVDESS-style labels.

    Its conv strides multiply to 320 like the full-size encoders', so its frames are 20 ms apart."""
    import torch
    from transformers import (Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForSequenceClassification,
                              WavLMConfig, WavLMForSequenceClassification)

    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(32,) * 3,
                 conv_stride=(5, 8, 8), conv_kernel=(10, 8, 8), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                 num_labels=len(CHECKPOINT_EMOTIONS), id2label=dict(enumerate(CHECKPOINT_EMOTIONS)),
                 label2id={v: k for k, v in enumerate(CHECKPOINT_EMOTIONS)})
    torch.manual_seed(seed)
    if kind == "wavlm":
        model = WavLMForSequenceClassification(WavLMConfig(**shape))
    else:
        model = Wav2Vec2ForSequenceClassification(Wav2Vec2Config(**shape))
    folder = Path(folder)
    model.eval().save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True, return_attention_mask=False).save_pretrained(folder)
    return folder


def train_emotion(folder: Path, steps: int = 40) -> Path:
    """Teach a saved tiny emotion classifier to call tones "hap" and noise "sad", then save it again,
    so that its probabilities move with the input (a random one's barely do)."""
    import torch
    from transformers import AutoModelForAudioClassification, Wav2Vec2FeatureExtractor

    extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(folder))
    model = AutoModelForAudioClassification.from_pretrained(str(folder)).train()
    clips, targets = _training_clips(rate=16000)
    values = torch.as_tensor(extractor(clips, sampling_rate=16000, return_tensors="np")["input_values"])
    target = torch.tensor([CHECKPOINT_EMOTIONS.index("hap" if t == 0 else "sad") for t in targets])
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(values).logits, target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval().save_pretrained(folder)
    return folder


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-models")
    print(build_clap(out / "clap"))
    print(build_emotion(out / "emotion"))
