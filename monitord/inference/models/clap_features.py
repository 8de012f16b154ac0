"""CLAP's log-mel features in torch, batched, on the model's device.

Reproduces ``ClapFeatureExtractor`` for windows up to its ``max_length`` (10 s): repeat-pad
(or repeat, or zero-pad) to 10 s, centred STFT with reflect padding, periodic Hann window,
power spectrum, the checkpoint's mel filter bank (Slaney for ``rand_trunc``, HTK for
``fusion``), ``10*log10(max(mel, 1e-10))``. Computed in float64 like the numpy original (~1e-9 dB
apart), then both round to float32, so they agree within one float32 step (under 1e-5 dB). The
numpy extractor converts every window to float64 and loops in Python, which costs 30-45 ms per
window on a desktop core.

A repeat-padded window is periodic: when its length is a whole number of hops and tiles
10 s exactly (2 s at 48 kHz: 200 hops, 5 tiles), every STFT frame away from the two ends
repeats every ``len/hop`` frames. Then only two tiles are transformed and the frames are
tiled, which gives the same numbers for 40 % of the work.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ClapFeatures:
    def __init__(self, extractor: Any, device: str):
        import torch

        self._torch = torch
        self.device = device
        self.truncation = extractor.truncation
        self.padding = extractor.padding
        self.max_length = int(extractor.nb_max_samples)
        self.n_fft = int(extractor.fft_window_size)
        self.hop = int(extractor.hop_length)
        filters = extractor.mel_filters if self.truncation == "fusion" else extractor.mel_filters_slaney
        self.mel_filters = torch.as_tensor(np.asarray(filters), dtype=torch.float64, device=device).T.contiguous()
        self.window = torch.hann_window(self.n_fft, periodic=True, dtype=torch.float64, device=device)
        self.frames = self.max_length // self.hop + 1

    def supports(self, length: int) -> bool:
        """Windows longer than max_length are cropped at random by the original: not reproduced here."""
        return 0 < length <= self.max_length

    def __call__(self, batch: np.ndarray) -> tuple[Any, Any]:
        """(input_features, is_longer) for a (B, samples) batch of equal-length windows."""
        torch = self._torch
        audio = torch.as_tensor(batch, dtype=torch.float64, device=self.device)
        length = audio.shape[1]
        if self.padding in ("repeatpad", "repeat") and length < self.max_length:
            n_repeat = self.max_length // length
            if self.padding == "repeat":
                n_repeat += 1
            if self.padding == "repeatpad" and self._periodic(length, n_repeat):
                mel = self._periodic_log_mel(audio, n_repeat)
            else:
                mel = self._log_mel(self._pad(audio.repeat(1, n_repeat)[:, : self.max_length]))
        else:
            mel = self._log_mel(self._pad(audio))
        features = mel.unsqueeze(1)
        if self.truncation == "fusion":
            features = features.expand(-1, 4, -1, -1)
        # Short windows are not "longer"; a fused model, like a one-clip pipeline call, marks them all.
        is_longer = torch.full((len(batch), 1), self.truncation == "fusion", dtype=torch.bool)
        return features.float(), is_longer

    def _periodic(self, length: int, n_repeat: int) -> bool:
        """Whether the two-tile shortcut gives exactly the full transform for this length."""
        edge = (self.n_fft // 2 + self.hop - 1) // self.hop
        return (
            n_repeat > 2
            and n_repeat * length == self.max_length
            and length % self.hop == 0
            and length // self.hop > 2 * edge
            and length >= self.n_fft + edge * self.hop  # the end frames see one tile only
        )

    def _pad(self, audio):
        missing = self.max_length - audio.shape[1]
        return self._torch.nn.functional.pad(audio, (0, missing)) if missing > 0 else audio

    def _log_mel(self, audio):
        """(B, frames, mels) in dB, as ``spectrogram(..., power=2, log_mel="dB")`` transposed."""
        torch = self._torch
        spec = torch.stft(audio, self.n_fft, self.hop, window=self.window, center=True, pad_mode="reflect", return_complex=True)
        power = spec.real.square() + spec.imag.square()
        mel = torch.matmul(self.mel_filters, power).clamp_(min=1e-10)
        return (10.0 * torch.log10(mel)).transpose(1, 2)

    def _periodic_log_mel(self, audio, n_repeat: int):
        torch = self._torch
        period = audio.shape[1] // self.hop
        edge = (self.n_fft // 2 + self.hop - 1) // self.hop  # frames that reach past either end
        two = self._log_mel(audio.repeat(1, 2))  # frames 0 .. 2*period
        head, tail = two[:, :edge], two[:, -edge:]
        interior = self.frames - 2 * edge
        cycle = two[:, edge : edge + period]
        body = cycle.repeat(1, n_repeat, 1)[:, :interior]
        return torch.cat([head, body, tail], dim=1)
