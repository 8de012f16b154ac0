"""The torch modules the engines convert: each model's forward pass with plain tensors in and out.

- CLAP: log-mel features (B, 1, 1001, 64) -> L2-normalised audio embeddings (B, projection), i.e.
  ``get_audio_features`` without the text tower, for unfused checkpoints (a fused one picks its
  fusion path per clip from ``is_longer``, data-dependent control flow no exporter keeps: torch).
- Speech emotion: samples (B, T) -> (logits over the checkpoint's labels, mean of the last hidden
  state), batch and length both free. Frame scores (granularity: frame) read a layer inside the
  pass through a hook: torch only.
"""

from __future__ import annotations

from typing import Any

from monitord.inference.engines import EncoderSpec, float32_copy


def clap_audio_spec(audio_model: Any, projection: Any, config: Any, model_ref: str, frames: int, mels: int) -> EncoderSpec:
    import torch

    if getattr(config.audio_config, "enable_fusion", False):
        raise ValueError("a fused CLAP checkpoint (enable_fusion) runs on torch only")

    class ClapAudio(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.audio_model = float32_copy(audio_model)
            self.audio_projection = float32_copy(projection)

        def forward(self, input_features):
            is_longer = torch.zeros(input_features.shape[0], 1, dtype=torch.bool)
            out = self.audio_model(input_features=input_features, is_longer=is_longer)
            return torch.nn.functional.normalize(self.audio_projection(out.pooler_output), dim=-1)

    module = ClapAudio().eval()
    example = (torch.randn(2, 1, frames, mels, generator=torch.Generator().manual_seed(0)) * 20 - 40,)
    return EncoderSpec("clap-audio", module, example, ("input_features",), ("embedding",), ((0,),), model_ref,
                       config.to_dict())


def emotion_spec(model: Any, model_ref: str, sample_rate: int) -> EncoderSpec:
    import torch

    class Emotion(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = float32_copy(model)

        def forward(self, input_values):
            out = self.model(input_values, output_hidden_states=True)
            return out.logits, out.hidden_states[-1].mean(dim=1)

    module = Emotion().eval()
    example = (torch.randn(2, 2 * sample_rate, generator=torch.Generator().manual_seed(0)),)
    return EncoderSpec("emotion", module, example, ("input_values",), ("logits", "pooled"), ((0, 1),), model_ref,
                       model.config.to_dict())
