"""The activity gate on synthetic and spoken sound."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from monitord.config import GateConfig
from monitord.types import Verdict
from monitord.windowing.gate import clean, inspect, measure
from tests.conftest import need, noise, silence, tone

RATE = 48000


def verdict(samples: np.ndarray, rate: int = RATE, **gate) -> bool:
    return inspect(samples, rate, GateConfig(**gate))[2] is Verdict.PASSED


@pytest.mark.parametrize("mode", ["energy", "speech"])
def test_silence_and_quiet_noise_do_not_pass(mode):
    assert not verdict(silence(2.0, RATE), mode=mode, threshold_dbfs=-50)
    assert not verdict(noise(2.0, RATE, dbfs=-65), mode=mode, threshold_dbfs=-50)


def test_steady_tone_below_threshold_does_not_pass_energy():
    assert not verdict(tone(1000, 2.0, RATE, dbfs=-55), mode="energy", threshold_dbfs=-50)
    assert verdict(tone(1000, 2.0, RATE, dbfs=-45), mode="energy", threshold_dbfs=-50)


def test_short_bang_in_a_quiet_window_passes_energy_by_onset():
    window = noise(2.0, RATE, dbfs=-75)
    bang = noise(0.03, RATE, dbfs=-20, seed=3)
    window[RATE : RATE + bang.size] += bang
    facts = measure(window, RATE)
    assert facts.rms_dbfs < -35  # averaged over 2 s the bang is below the threshold...
    assert verdict(window, mode="energy", threshold_dbfs=-30)  # ...but its frame jumps out


def test_always_passes_everything():
    assert verdict(silence(2.0, RATE), mode="always")


def test_cleaning_replaces_non_finite_and_removes_dc():
    x = tone(440, 1.0, RATE, dbfs=-20) + np.float32(0.2)
    x[100:110] = np.nan
    x[200] = np.inf
    cleaned, non_finite, dc = clean(x)
    assert non_finite == 11 and np.isfinite(cleaned).all()
    assert abs(dc - 0.2) < 0.01 and abs(float(cleaned.mean())) < 1e-3


def test_clipping_is_measured():
    x = np.clip(tone(440, 1.0, RATE, dbfs=0) * 2, -1, 1)
    assert measure(x, RATE).clipped_ratio > 0.3


def espeak(text: str, tmp_path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    need(shutil.which("espeak-ng") is not None, "espeak-ng is not installed")
    path = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, timeout=30)
    data, rate = sf.read(str(path), dtype="float32")
    return data, rate


def test_espeak_speech_passes_speech_mode(tmp_path):
    speech, rate = espeak("The quick brown fox jumps over the lazy dog near the river bank.", tmp_path)
    window = speech[: 2 * rate]
    _, facts, verdict = inspect(window, rate, GateConfig(mode="speech", threshold_dbfs=-50))
    assert verdict is Verdict.PASSED and facts.speech_ratio is not None and facts.speech_ratio >= 0.5


def test_periodic_mode_samples_a_steady_sound_and_lets_onsets_through():
    from monitord.config import WindowConfig
    from monitord.windowing.tiling import ModelInput, WindowCutter, window_starts

    rate = 16000
    steady = tone(120, 30.0, rate, dbfs=-20) + noise(30.0, rate, -40)
    bang = noise(0.03, rate, -3, seed=9)
    at = int(17.2 * rate)
    steady[at : at + bang.size] += bang
    cutter = WindowCutter("m", rate, WindowConfig(seconds=2.0, hop_s=0.5), GateConfig(mode="periodic", every_s=5.0, threshold_dbfs=-50),
                          {"clap": ModelInput(rate)})
    passed = [w.stream_start for w in (cutter.cut(steady[s : s + 2 * rate], s, 0, 0) for s in window_starts(len(steady), 2 * rate, rate // 2)) if w.passed]
    # one window every 5 s of a steady hum; every window holding the bang at 17.2 s at once; then every 5 s again
    assert passed == [0.0, 5.0, 10.0, 15.0, 15.5, 16.0, 16.5, 17.0, 22.0, 27.0]
    quiet = WindowCutter("q", rate, WindowConfig(), GateConfig(mode="periodic", threshold_dbfs=-50), {"clap": ModelInput(rate)})
    assert not quiet.cut(silence(2.0, rate), 0, 0, 0).passed  # silence is never sampled


def test_windows_skipped_by_periodic_sampling_neither_start_nor_end_alerts():
    from monitord.alerts.engine import AlertEngine
    from monitord.config import RuleConfig, WindowConfig
    from monitord.inference.scoring import Scorer
    from monitord.windowing.tiling import ModelInput, WindowCutter, window_starts
    from tests.test_faults import ScriptedModel

    rate = 16000
    audio = tone(120, 20.0, rate, dbfs=-20)  # a steady machine: every scored window says "tone"
    cutter = WindowCutter("m", rate, WindowConfig(seconds=2.0, hop_s=0.5), GateConfig(mode="periodic", every_s=5.0, threshold_dbfs=-50),
                          {"clap": ModelInput(rate)})
    windows = [cutter.cut(audio[s : s + 2 * rate], s, 0, 0) for s in window_starts(len(audio), 2 * rate, rate // 2)]
    engine = AlertEngine((RuleConfig(id="hum", model="clap", label="tone", threshold=0.5, min_windows=2, of_windows=3),))
    phases = []
    for scored in Scorer([ScriptedModel()]).process(windows):
        for outcome in scored.outcomes:
            phases += [t.phase for t in engine.observe("m", outcome, scored.window.stream_end)]
    assert sum(w.passed for w in windows) == 4
    assert all(w.gates["clap"] is Verdict.SAMPLED_OUT for w in windows if not w.passed)
    assert phases == ["onset"]  # two sampled windows 5 s apart make the 2-of-3, and the skipped ones end nothing


def test_each_gate_measures_with_its_own_vad():
    """A model gated on silero never reuses the webrtc share the source's gate measured: a pure
    tone is "speech" to webrtc and nothing to silero."""
    from monitord.config import WindowConfig
    from monitord.windowing.tiling import ModelInput, WindowCutter

    rate = 16000
    cutter = WindowCutter("s", rate, WindowConfig(), GateConfig(mode="speech", vad="webrtc"),
                          {"clap": ModelInput(rate), "emotion": ModelInput(rate, GateConfig(mode="speech", vad="silero")),
                           "emotion2": ModelInput(rate, GateConfig(mode="speech", vad="silero", threshold_dbfs=-60))})
    window = cutter.cut(tone(440, 2.0, rate, dbfs=-12), 0, 0.0, 0.0)
    assert window.gates["clap"] is Verdict.PASSED  # the source gate: webrtc calls the tone speech
    assert window.gates["emotion"] is Verdict.QUIET and window.gates["emotion2"] is Verdict.QUIET
    assert window.facts.speech["webrtc"] == 1.0 and window.facts.speech["silero"] == 0.0
    assert window.facts.speech_ratio == 0.0  # the speech share reported is silero's


def test_garbage_floats_never_reach_a_model_and_are_counted():
    """A corrupt float file's random bits: NaN, Inf and values up to 3e38, which overflowed the
    level (+745 dBFS, passed) and reached the models as Inf/NaN after resampling."""
    from monitord.config import WindowConfig
    from monitord.windowing.tiling import ModelInput, WindowCutter

    garbage = np.random.default_rng(1).integers(0, 2**32, 44100, dtype=np.uint32).view(np.float32)
    huge = np.full(44100, 3e38, np.float32)
    loud = tone(1000, 1.0, 44100, -6).copy()
    loud[::100] = 1e30  # a sound with corrupt samples in it
    cutter = WindowCutter("a", 44100, WindowConfig(seconds=1.0, hop_s=1.0), GateConfig(mode="energy", threshold_dbfs=-50),
                          {"m": ModelInput(16000)})
    for samples, expect_bad in ((garbage, None), (huge, 44100), (loud, 441)):
        window = cutter.cut(samples, 0, 0.0, 1.0)
        assert np.isfinite(window.samples).all() and np.isfinite(window.facts.rms_dbfs)
        assert window.facts.rms_dbfs < 40, window.facts
        if expect_bad is not None:
            assert window.facts.non_finite == expect_bad
        if window.passed:
            assert np.isfinite(window.at_rate(16000)).all()
    assert cutter.cut(loud, 0, 0.0, 1.0).passed  # the sound around the corrupt samples still counts


@pytest.mark.parametrize("offset", [0.004, 0.009, 0.01, -0.2])
def test_a_dc_offset_on_silence_is_no_sound(offset):
    """Below DC_LIMIT the offset stays in the samples; levels are measured without it either way."""
    x = np.full(32000, offset, np.float32) + noise(2.0, 16000, -90)
    _, facts, verdict = inspect(x, 16000, GateConfig(mode="energy", threshold_dbfs=-50))
    assert facts.rms_dbfs < -80 and verdict == Verdict.QUIET, facts
