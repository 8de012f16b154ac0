"""Bad input of every kind gets a clear message, never a traceback, never a stalled pipeline."""

from __future__ import annotations

import copy
import subprocess
import wave

import numpy as np
import pytest
import soundfile as sf
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitord.config import ConfigError, parse_config
from tests.conftest import REPO, monitord_cmd, noise, tone
from tests.test_config import VALID


def classify(path, config) -> subprocess.CompletedProcess:
    return subprocess.run(monitord_cmd("classify", str(path), "-c", str(config), "--json"), cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def config(tmp_path, random_clap):
    path = tmp_path / "c.yaml"
    path.write_text(f"""
sources: [{{id: a, device: default}}]
gate: {{mode: always}}
models: {{clap: {{kind: clap, model: {random_clap}, labels: [tone, noise, speech], dtype: float32}}}}
""")
    return path


def odd_files(tmp_path):
    rate = 48000
    x = tone(440, 3.0, rate, -12)
    nan = x.copy()
    nan[1000:5000] = np.nan
    nan[9000] = np.inf
    files = {
        "nan-inf.wav": (nan, rate, "FLOAT"),
        "dc-offset.wav": (x * 0.5 + 0.4, rate, "FLOAT"),
        "clipped.wav": (np.clip(x * 8, -1, 1), rate, "PCM_16"),
        "silence.wav": (np.zeros(rate * 3, np.float32), rate, "PCM_16"),
        "stereo.wav": (np.stack([x, noise(3.0, rate, -20)], axis=1), rate, "PCM_16"),
        "six-channel.wav": (np.stack([x] * 6, axis=1), rate, "PCM_24"),
        "8k.wav": (tone(440, 3.0, 8000, -12), 8000, "PCM_16"),
        "96k.wav": (tone(440, 3.0, 96000, -12), 96000, "PCM_24"),
        "float.flac": (x, rate, "PCM_24"),
        "short.wav": (tone(440, 0.05, rate, -12), rate, "PCM_16"),
    }
    for name, (data, r, subtype) in files.items():
        sf.write(str(tmp_path / name), data, r, subtype=subtype)
    return list(files)


def test_odd_but_valid_audio_is_cleaned_converted_and_flagged(tmp_path, config):
    from monitord.tools.classify import classify_file
    from monitord.config import load_config
    from monitord.inference.build import load_models

    loaded = load_config(config)
    models = load_models(loaded)
    for name in odd_files(tmp_path):
        rows = [r.to_dict() for r in classify_file(tmp_path / name, loaded, models)]
        assert rows, name
        for row in rows:
            probs = row["scores"]["clap"]
            assert abs(sum(probs.values()) - 1) < 1e-4 and all(np.isfinite(list(probs.values()))), name
        if name == "nan-inf.wav":
            assert rows[0]["gate"]["non_finite"] == 4001
        if name == "dc-offset.wav":
            assert abs(rows[0]["gate"]["dc_offset"] - 0.4) < 0.01
        if name == "clipped.wav":
            assert rows[0]["gate"]["clipped_ratio"] > 0.5


def test_unreadable_files_are_rejected_with_a_clear_message(tmp_path, config):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("this is not audio\n" * 100)
    with wave.open(str(tmp_path / "no-frames.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
    good = tmp_path / "good.wav"
    sf.write(str(good), tone(440, 2.0, 16000), 16000, subtype="PCM_16")
    (tmp_path / "truncated.wav").write_bytes(good.read_bytes()[:1000])
    for name, expected in (("empty.wav", "cannot read audio file"), ("text.wav", "cannot read audio file"),
                           ("no-frames.wav", "holds no samples"), ("missing.wav", "cannot read audio file")):
        out = classify(tmp_path / name, config)
        assert out.returncode == 2 and expected in out.stderr and "Traceback" not in out.stderr, (name, out.stderr)
    out = classify(tmp_path / "truncated.wav", config)  # a header that promises more than is there
    assert "Traceback" not in out.stderr and (out.returncode == 0 or "cannot read" in out.stderr), out.stderr


def test_a_non_audio_file_source_stops_the_daemon_with_exit_2(tmp_path, random_clap):
    (tmp_path / "notes.wav").write_text("not audio")
    path = tmp_path / "c.yaml"
    path.write_text(f"sources: [{{id: a, file: notes.wav}}]\nmodels: {{clap: {{kind: clap, model: {random_clap}, labels: [a, b]}}}}\n"
                    "publish: {endpoint: 'tcp://127.0.0.1:5999', event_log: e.jsonl}\n")
    out = subprocess.run(monitord_cmd("run", "-c", str(path)), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "cannot read audio file" in out.stderr and "Traceback" not in out.stderr


BASE = yaml.safe_load(VALID)
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=12),
                   st.lists(st.text(max_size=5), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, prefix + (i,))


ALL_PATHS = [p for p in paths(BASE) if p]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(st.tuples(st.sampled_from(ALL_PATHS), st.sampled_from(["set", "delete", "extra"]), LEAVES), min_size=1, max_size=4))
def test_mutated_configs_are_valid_or_named_problems_never_a_crash(tmp_path, mutations):
    data = copy.deepcopy(BASE)
    for path, action, value in mutations:
        parent = data
        try:
            for key in path[:-1]:
                parent = parent[key]
            if action == "set":
                parent[path[-1]] = value
            elif action == "delete" and isinstance(parent, dict):
                parent.pop(path[-1], None)
            elif action == "extra" and isinstance(parent, dict):
                parent["unexpected_key"] = value
        except (KeyError, IndexError, TypeError):
            continue
    (tmp_path / "sample.wav").write_bytes(b"")
    text = yaml.safe_dump(data)
    try:
        parse_config(text, tmp_path)
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert ": " in str(problem) and str(problem).split(":")[0].strip()


def lying_wav(path, rate: int = 100_000_000, channels: int = 1) -> None:
    """A real 16 kHz WAV whose header then claims ``rate`` Hz and ``channels`` channels (a 2 KB file)."""
    sf.write(path, tone(440, 0.05, 16000, -12), 16000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    data[22:24] = channels.to_bytes(2, "little")
    data[24:28] = rate.to_bytes(4, "little")
    data[28:32] = (rate * 2 * channels).to_bytes(4, "little")
    data[32:34] = (2 * channels).to_bytes(2, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("rate, channels, said", [(100_000_000, 1, "100000000 Hz"), (4000, 1, "4000 Hz"),
                                                  (16000, 1000, "1000 channels")])
def test_a_file_whose_header_claims_a_rate_or_channels_out_of_range_is_refused_before_anything_is_sized(tmp_path, rate, channels, said):
    from monitord.audio import AudioFileError, read_mono
    from monitord.config import SourceConfig
    from monitord.sources import SourceError
    from monitord.sources.file import FileSource

    path = tmp_path / "lie.wav"
    lying_wav(path, rate, channels)
    assert sf.info(str(path)).samplerate == rate and sf.info(str(path)).channels == channels  # libsndfile believes it
    with pytest.raises(SourceError, match=said):
        FileSource(SourceConfig(id="f", file=str(path)), ring_seconds=60.0, on_status=lambda *a: None)
    with pytest.raises(AudioFileError, match=said):
        read_mono(path)


def test_classify_refuses_a_file_claiming_100_mhz_with_exit_2(tmp_path, config):
    path = tmp_path / "lie.wav"
    lying_wav(path)
    result = classify(path, config)
    assert result.returncode == 2, result.stderr
    assert "100000000 Hz is outside 8000-384000 Hz" in result.stderr and "Traceback" not in result.stderr


def damaged_mp3s(tmp_path):
    """An MP3 of 6 s (LAME, with its Xing/Info header) cut in half, and the half with a header
    claiming 0x7FFFFFFF frames (about 29 days): (cut, claims_days, seconds really held)."""
    import shutil
    import struct

    from tests.conftest import need, write_wav

    need(shutil.which("ffmpeg") is not None, "ffmpeg is not installed (Debian package ffmpeg)")
    rate = 22050
    bursts = np.concatenate([np.concatenate([noise(0.5, rate, -12, seed=i), np.zeros(rate // 2, np.float32)]) for i in range(6)])
    write_wav(tmp_path / "whole.wav", bursts, rate)
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(tmp_path / "whole.wav"), "-codec:a", "libmp3lame",
                    "-b:a", "64k", str(tmp_path / "whole.mp3")], check=True, timeout=60)
    data = (tmp_path / "whole.mp3").read_bytes()
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(data[: len(data) // 2])
    held = sf.read(str(cut), dtype="float32")[0].shape[0] / rate
    header = bytearray(data[: len(data) // 2])
    at = max(header.find(b"Xing"), header.find(b"Info"))
    assert at >= 0 and struct.unpack(">I", header[at + 4 : at + 8])[0] & 1, "LAME wrote no frame count"
    header[at + 8 : at + 12] = struct.pack(">I", 0x7FFFFFFF)
    claims = tmp_path / "claims.mp3"
    claims.write_bytes(bytes(header))
    assert sf.info(str(cut)).duration > held + 2 and sf.info(str(claims)).duration > 86400
    return cut, claims, held


def test_a_damaged_file_is_read_for_what_it_holds_not_for_what_its_header_claims(tmp_path):
    """soundfile's blocks() counts down the header's length and hands out its last buffer again
    where the file ends early: the source played a cut MP3's last 0.1 s over and over to the
    header's end, and one claiming 29 days forever. read_mono asked for 4.5 TiB at once."""
    from monitord.audio import read_mono
    from monitord.config import GateConfig, Config
    from monitord.tools.classify import count_windows
    from tests.conftest import file_windows

    cut, claims, held = damaged_mp3s(tmp_path)
    for path in (cut, claims):
        rate, windows, statuses = file_windows(path, GateConfig(mode="energy", threshold_dbfs=-60), rates=(16000,))
        assert windows[-1].stream_end <= held + 0.01, (path.name, windows[-1].stream_end, held)
        eof = [detail for status, detail in statuses if status == "eof"]
        assert len(eof) == 1 and f"after {held:.2f} s" in eof[0] and "cut short or damaged" in eof[0], statuses
        samples, rate = read_mono(path)
        assert abs(len(samples) / rate - held) < 0.01
    # a whole MP3 without a frame count (its length estimated from the bitrate, a little long) is not called damaged
    plain = tmp_path / "plain.mp3"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(tmp_path / "whole.wav"), "-codec:a", "libmp3lame",
                    "-b:a", "64k", "-write_xing", "0", str(plain)], check=True, timeout=60)
    _, _, statuses = file_windows(plain, GateConfig(mode="energy", threshold_dbfs=-60), rates=(16000,))
    eof = [detail for status, detail in statuses if status == "eof"]
    assert len(eof) == 1 and "damaged" not in eof[0], eof
    config = Config.model_validate({"sources": [{"id": "a", "device": "default"}], "models": {"yam": {"kind": "yamnet"}}})
    total, seconds = count_windows(claims, config)  # the header's word, for a progress bar: a count, not a list
    assert seconds > 86400 and total > 86400


def test_check_config_refuses_a_file_source_that_run_would_refuse(tmp_path):
    (tmp_path / "text.wav").write_text("this is not audio\n" * 100)
    (tmp_path / "c.yaml").write_text("sources: [{id: a, file: text.wav}]\nmodels: {yam: {kind: yamnet}}\n")
    out = subprocess.run(monitord_cmd("check-config", str(tmp_path / "c.yaml")), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "ok" not in out.stdout, out.stdout
    assert f"sources.0.file: cannot read audio file {tmp_path / 'text.wav'}" in out.stderr, out.stderr
