"""Teaching by example (issue #19): banks, the examples model, rules' taught false alarms, ``monitord teach``.

Real recordings from ../shared/audio and the YAMNet shipped with monitord; tests that need the
recordings skip (CI: fail) where ../shared is absent."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitord.cli import main
from monitord.config import load_config
from monitord.teaching.bank import Bank, BankError, BankFile, Embedder, load, negative, save
from monitord.teaching.knn import calibrate
from monitord.teaching.suppress import NotLike, nearest_negative
from monitord.inference.models.yamnet import BUILTIN_FILE, EMBEDDING_TENSOR, frame_levels, mean_embedding
from tests.conftest import AUDIO, REPO, free_port, shared_path

YAM = Embedder("yamnet:builtin", 1024, 16000, 2.0)
THUNDER = AUDIO / "thunder" / "thunder.wav"
THUNDER_OTHER = AUDIO / "thunder" / "esc50_thunder_3-144891-B-19.wav"
APPLAUSE = AUDIO / "applause" / "applause.wav"
NON_SPEECH = ["alarm_clock", "applause", "birds", "car_horn", "cat", "cheering", "coughing", "engine",
              "keyboard_typing", "rain", "snoring", "thunder", "train"]


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def a_bank(n: int = 6, seed: int = 0) -> Bank:
    rng = np.random.default_rng(seed)
    bank = Bank.empty(YAM).add(rng.random((n, 1024)), "glass", [f"file:/a.wav@{i * 0.5}" for i in range(n)])
    return bank.add(rng.random((2, 1024)), negative("glass-break"), ["clip:/c.flac@2.000", "event:7:clip:/d.flac@2.000"])


CONFIG = """
sources:
  - id: thunder
    file: {thunder}
  - id: applause
    file: {applause}
window: {{seconds: {seconds}}}
models:
  yam:
    kind: yamnet
    groups: {{loud: [Explosion, Fireworks, Applause]}}
  taught:
    kind: examples
    bank: taught.npz
    labels: [thunder, applause]
    embedding_model: yam
rules:
  - id: loud
    model: yam
    label: loud
    threshold: 0.5
    not_like: {{bank: loud-not.npz, margin: 0.35}}
publish: {{endpoint: "tcp://127.0.0.1:{port}", event_log: events.jsonl}}
"""


def write_config(folder: Path, seconds: float = 2.0) -> Path:
    path = folder / "monitord.yaml"
    path.write_text(CONFIG.format(thunder=THUNDER, applause=APPLAUSE, seconds=seconds, port=free_port()))
    return path


# --- the YAMNet embedding ------------------------------------------------------------------------------------------

def test_yamnet_embedding_is_the_pooling_tensor_read_in_the_same_pass():
    from ai_edge_litert.interpreter import Interpreter

    from monitord.config import YamnetModelConfig
    from monitord.inference.models.yamnet import YamnetClassifier

    names = [t["name"].split(";")[0] for t in Interpreter(model_path=str(BUILTIN_FILE)).get_tensor_details()]
    assert EMBEDDING_TENSOR in names
    model = YamnetClassifier("yam", YamnetModelConfig(kind="yamnet"))
    from monitord.audio import read_mono
    from monitord.config import GateConfig, WindowConfig
    from monitord.windowing.tiling import ModelInput, WindowCutter

    samples, rate = read_mono(shared_path(APPLAUSE))
    cutter = WindowCutter("a", rate, WindowConfig(), GateConfig(mode="always"), {"yam": ModelInput(16000)})  # as the daemon cuts
    windows = [cutter.cut(samples[s : s + cutter.length], s, 0.0, 0.0) for s in (0, rate * 3)]
    scores = model.score(windows)
    frames, embeddings = model.frames(windows[0].at_rate(16000))
    assert embeddings.shape == (len(frames), 1024) and np.all(embeddings >= 0) and embeddings.std() > 0
    e = scores[0].embedding
    assert e.shape == (1024,) and e.dtype == np.float32 and abs(np.linalg.norm(e) - 1) < 1e-5
    np.testing.assert_allclose(e, mean_embedding(embeddings, frame_levels(windows[0].at_rate(16000))), atol=1e-6)
    # the scores are those of the plain export (preserving tensors changes nothing)
    plain = Interpreter(model_path=str(BUILTIN_FILE))
    plain.allocate_tensors()
    plain.set_tensor(plain.get_input_details()[0]["index"], windows[0].at_rate(16000)[:15600].astype(np.float32))
    plain.invoke()
    np.testing.assert_allclose(frames[0], plain.get_tensor(plain.get_output_details()[0]["index"])[0], atol=1e-6)
    assert 1 - float(scores[0].embedding @ scores[1].embedding) < 0.3  # two windows of one applause


def test_silent_frames_are_left_out_of_a_windows_embedding():
    frames = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    np.testing.assert_allclose(mean_embedding(frames), unit(np.array([1.0, 4.0])))
    np.testing.assert_allclose(mean_embedding(frames, np.array([-90.0, -20.0, -45.0])), [0.0, 1.0])  # 30 dB rule
    np.testing.assert_allclose(mean_embedding(frames, np.array([-200.0, -200.0, -200.0])), unit(np.array([1.0, 4.0])))
    levels = frame_levels(np.concatenate([np.zeros(16000), 0.1 * np.ones(16000)]).astype(np.float32))
    assert len(levels) == 4 and levels[0] < -150 and levels[-1] > -21


# --- banks ---------------------------------------------------------------------------------------------------------

def test_bank_round_trip_versions_and_owner_only(tmp_path):
    path = tmp_path / "banks" / "b.npz"
    bank = a_bank()
    save(bank, path)
    back = load(path)
    assert back.embedder == YAM and len(back) == 8 and back.next_id == 9
    np.testing.assert_allclose(back.embeddings, bank.embeddings, atol=1e-6)
    assert back.labels.tolist() == bank.labels.tolist() and back.sources.tolist() == bank.sources.tolist()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for i in range(7):
        back = back.add(np.ones((1, 1024)), "glass", [f"file:/x.wav@{i}"])
        save(back, path)
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == ["b.npz", "b.npz.1", "b.npz.2", "b.npz.3", "b.npz.4", "b.npz.5"]  # nothing temporary left
    assert len(load(path.parent / "b.npz.1")) == len(load(path)) - 1
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o600 for p in path.parent.iterdir())
    forgotten = load(path).forget([1, 2])
    assert 1 not in forgotten.ids and forgotten.add(np.ones((1, 1024)), "glass", ["x@0"]).ids[-1] == 16  # ids never reused
    with pytest.raises(KeyError, match="no example with id 999"):
        forgotten.forget([999])


def test_a_bank_of_another_model_or_window_is_refused_with_a_message():
    bank = a_bank()
    bank.check(YAM, "here")
    with pytest.raises(BankError, match=r"embeddings of yamnet:builtin \(1024-d\), not laion/clap"):
        bank.check(Embedder("laion/clap-htsat-unfused", 512, 48000, 2.0), "models.x.bank")
    with pytest.raises(BankError, match=r"2 s windows at 16000 Hz, not 1 s at 16000 Hz"):
        bank.check(Embedder("yamnet:builtin", 1024, 16000, 1.0), "models.x.bank")


def test_hostile_bank_files_are_clear_errors(tmp_path):
    good = tmp_path / "good.npz"
    save(a_bank(), good)
    data = good.read_bytes()
    cases = {"truncated": data[: len(data) // 2], "garbage": os.urandom(5000), "empty": b""}
    for name, content in cases.items():
        (tmp_path / f"{name}.npz").write_bytes(content)
    # a valid zip whose embeddings claim a huge shape (10^9 x 1024 float32), and one with an object array
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(tmp_path / "huge.npz", "w") as dst, \
            zipfile.ZipFile(tmp_path / "object.npz", "w") as obj:
        for item in src.infolist():
            content = src.read(item)
            if item.filename == "embeddings.npy":
                header = {"descr": "<f4", "fortran_order": False, "shape": (10**9, 1024)}
                import io
                buf = io.BytesIO()
                np.lib.format.write_array_header_1_0(buf, header)
                dst.writestr(item.filename, buf.getvalue() + b"\0" * 64)
                buf = io.BytesIO()
                np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": (2,)})
                obj.writestr(item.filename, buf.getvalue() + b"\0" * 64)
            else:
                dst.writestr(item.filename, content)
                obj.writestr(item.filename, content)
    for name in [*cases, "huge", "object", "missing"]:
        with pytest.raises(BankError, match="bank .* (is not a|does not exist)"):
            load(tmp_path / f"{name}.npz")


def test_a_zip_bomb_bank_is_refused_before_anything_is_decompressed(tmp_path, monkeypatch):
    """An npz is a zip: a member may be deflated, so a file of kilobytes can hold gigabytes that pass
    every per-member check (200000 labels of U4096 are 3.3 GB; embeddings of (1, 10^9) are 4 GB and
    their dimension was checked only after the read). save() stores members uncompressed, so a
    compressed member, or one claiming more than it stores, is refused before it is read."""
    n = 3000
    rng = np.random.default_rng(0)
    path = tmp_path / "bomb.npz"
    arrays = dict(format=np.str_("monitord.examples/1"), model_id=np.str_("yamnet:builtin"), dim=np.int64(4),
                  sample_rate=np.int64(16000), window_s=np.float64(2.0), next_id=np.int64(n + 1),
                  embeddings=rng.random((n, 4)).astype(np.float32), ids=np.arange(1, n + 1, dtype=np.int64),
                  labels=np.full(n, "x" * 4096), sources=np.full(n, "s@0"), added=np.full(n, "t"))
    np.savez_compressed(path, **arrays)
    assert path.stat().st_size < 2_000_000  # 49 MB of labels in a small file
    read = []
    real_read = np.lib.format.read_array
    monkeypatch.setattr(np.lib.format, "read_array", lambda f, **k: read.append(1) or real_read(f, **k))
    with pytest.raises(BankError, match="compressed"):
        load(path)
    wide = tmp_path / "wide.npz"
    np.savez(wide, **{**arrays, "embeddings": np.zeros((1, MAX_DIM_PLUS), np.float32), "dim": np.int64(MAX_DIM_PLUS)})
    read.clear()
    with pytest.raises(BankError, match="embeddings"):
        load(wide)
    assert len(read) == 6  # the six scalars before them: the wide embeddings were refused on their header, never read


MAX_DIM_PLUS = 4097


def _add_many(path: str, label: str, count: int) -> None:
    from monitord.teaching.teach import add

    for i in range(count):
        add(Path(path), YAM, np.random.default_rng(i).random((1, 1024)), label, [f"file:/{label}.wav@{i}"])


def test_a_bank_with_a_nan_window_length_is_refused_not_comparable_with_every_window(tmp_path):
    """Embedder.mismatch compares window lengths with abs(a - b) > 1e-9, which is False for NaN: a
    bank whose window_s is NaN passed check() against every window length."""
    path = tmp_path / "nan.npz"
    bank = a_bank()
    save(bank, path)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    for field, value in (("window_s", np.float64("nan")), ("window_s", np.float64(-2.0)), ("sample_rate", np.int64(0))):
        np.savez(path, **{**arrays, field: value})
        with pytest.raises(BankError, match="not a sound monitord bank"):
            load(path)


def test_a_bank_with_text_that_is_not_unicode_is_a_clear_error(tmp_path):
    """npy text is UCS-4: a label of code point 0x110000 loaded, then raised SystemError (no
    BankError) wherever it became a str: `monitord teach --list` crashed with a traceback, and the
    daemon's calibration and not_like match (str(bank.sources[i])) raised it on every window."""
    path = tmp_path / "b.npz"
    save(Bank.empty(Embedder("yamnet:builtin", 4, 16000, 2.0)).add(np.ones((2, 4)), "a", ["s@0", "s@1"]), path)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    for bad in ([0x110000, 0, 0x41, 0x42], [0xD800, 0x41, 0, 0]):  # past U+10FFFF; a lone surrogate
        text = np.frombuffer(np.array(bad, dtype="<u4").tobytes(), dtype="<U2")
        for field in ("labels", "sources"):
            np.savez(path, **{**arrays, field: text})
            with pytest.raises(BankError, match="not Unicode"):
                load(path)
    # a recording whose file name is not UTF-8 (os gives it as lone surrogates) is taught, and readable
    name = os.fsdecode(b"/rec/caf\xe9.wav")
    save(Bank.empty(Embedder("yamnet:builtin", 4, 16000, 2.0)).add(np.ones((1, 4)), "a", [f"file:{name}@0"]), path)
    assert load(path).sources.tolist() == ["file:/rec/caf\ufffd.wav@0"]


def test_a_bank_is_never_written_larger_than_load_accepts(tmp_path, monkeypatch):
    """save() wrote any size and load() refuses more than MAX_EXAMPLES: the next teach, feedback or
    daemon start found the whole bank unreadable. add() refuses instead, with what to do."""
    from monitord.teaching import bank as bank_module
    from monitord.teaching.teach import TeachError, add

    monkeypatch.setattr(bank_module, "MAX_EXAMPLES", 5)
    path = tmp_path / "b.npz"
    add(path, YAM, np.random.default_rng(0).random((4, 1024)), "glass", [f"file:/a.wav@{i}" for i in range(4)])
    with pytest.raises(TeachError, match="at most 5 examples"):
        add(path, YAM, np.random.default_rng(1).random((2, 1024)), "glass", ["file:/b.wav@0", "file:/b.wav@1"])
    assert len(load(path)) == 4


def test_a_symlinked_bank_stays_a_symlink_and_writers_through_either_name_lose_nothing(tmp_path):
    """save() renamed its new file over the symlink (the link became a private copy, the file it
    pointed to never changed again), and locked() took the lock beside the link: a writer through
    the link and one through the real path held different locks and lost each other's examples."""
    import multiprocessing

    real = tmp_path / "shared" / "b.npz"
    real.parent.mkdir()
    link = tmp_path / "b.npz"
    link.symlink_to(real)
    save(a_bank(), link)
    assert link.is_symlink() and len(load(real)) == 8
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_add_many, args=(str(p), label, 6)) for p, label in ((link, "one"), (real, "two"))]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
        assert w.exitcode == 0
    bank = load(link)
    assert link.is_symlink() and len(bank) == 8 + 12, len(bank)
    assert len(set(bank.ids.tolist())) == 20


def test_a_bank_file_is_read_again_when_it_changes_and_a_bad_write_keeps_the_last_good(tmp_path):
    path = tmp_path / "b.npz"
    watched = BankFile(path)
    assert watched.get() is None
    save(a_bank(), path)
    first = watched.get()
    assert len(first) == 8 and watched.get() is first  # not read again while unchanged
    save(first.forget([1]), path)
    assert len(watched.get()) == 7
    path.write_bytes(b"not a bank")
    assert len(watched.get()) == 7


# --- suppression (pure) --------------------------------------------------------------------------------------------

vectors = st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=8, max_size=8).filter(lambda v: sum(v) > 0.1)


@settings(max_examples=200, deadline=None)
@given(st.lists(vectors, min_size=1, max_size=6), st.lists(vectors, max_size=6), vectors, st.floats(0.01, 1.0))
def test_nearest_negative_suppresses_only_close_to_a_negative_and_closer_than_any_positive(negs, poss, x, margin):
    emb = Embedder("m", 8, 16000, 2.0)
    bank = Bank.empty(emb).add(np.array(negs), negative("r"), [f"n@{i}" for i in range(len(negs))])
    if poss:
        bank = bank.add(np.array(poss), "glass", [f"p@{i}" for i in range(len(poss))])
    bank = bank.add(np.array([x]), negative("other-rule"), ["o@0"])  # another rule's negatives never count
    x = np.array(x, dtype=np.float32)
    d = 1 - bank.embeddings @ (x / np.linalg.norm(x))
    d_neg = float(d[bank.labels == negative("r")].min())
    d_pos = float(d[bank.labels == "glass"].min()) if poss else np.inf
    match = nearest_negative(x, bank, "r", "glass", margin)
    if min(abs(d_neg - margin), abs(d_neg - d_pos)) < 1e-5:
        return  # a tie within float32 rounding: either answer is right
    assert (match is not None) == bool(d_neg <= margin and d_neg < d_pos)
    if match is not None:
        assert bank.labels[bank.ids == match.id][0] == negative("r") and abs(match.distance - d_neg) < 1e-5
    assert nearest_negative(x, bank, "no-such-rule", "glass", margin) is None


def test_a_window_like_a_taught_false_alarm_is_suppressed_at_once_and_a_taught_true_one_wins(tmp_path):
    rule = SimpleNamespace(id="glass-break", model="yam", label="glass", not_like=SimpleNamespace(bank=str(tmp_path / "b.npz"), margin=0.2))
    rng = np.random.default_rng(1)
    alarm, glass = unit(rng.random(1024)), unit(rng.random(1024))
    scores = SimpleNamespace(model="yam", model_id="yamnet:builtin", embedding=alarm)
    not_like = NotLike()
    assert not_like.matches([rule], scores) == {}  # no bank yet
    save(Bank.empty(YAM).add(alarm[None], negative("glass-break"), ["clip:/c.flac@2.000"]), tmp_path / "b.npz")
    match = not_like.matches([rule], scores)["glass-break"]  # the same object, no reload
    assert match.id == 1 and match.distance < 1e-5 and match.source == "clip:/c.flac@2.000"
    assert not_like.matches([rule], SimpleNamespace(model="yam", model_id="yamnet:builtin", embedding=glass)) == {}
    save(load(tmp_path / "b.npz").add(alarm[None], "glass", ["file:/mine.wav@0"]), tmp_path / "b.npz")
    assert not_like.matches([rule], scores) == {}  # as close to a taught true alarm: it counts
    other = SimpleNamespace(model="yam", model_id="laion/clap", embedding=alarm)
    assert not_like.matches([rule], other) == {}  # embeddings of another model: never compared


def test_a_not_like_bank_of_another_window_length_suppresses_nothing(tmp_path, caplog):
    """The bank records the window length its embeddings were cut at and the module says a bank of
    another one is refused, but NotLike compared only the model and the dimension: after
    ``window.seconds`` changed, the old bank's 2 s examples went on suppressing 1 s windows."""
    import logging

    rule = SimpleNamespace(id="glass-break", model="yam", label="glass", not_like=SimpleNamespace(bank=str(tmp_path / "b.npz"), margin=0.2))
    alarm = unit(np.random.default_rng(1).random(1024))
    save(Bank.empty(YAM).add(alarm[None], negative("glass-break"), ["clip:/c.flac@2.000"]), tmp_path / "b.npz")

    def scores(seconds: float):
        window = SimpleNamespace(samples=np.zeros(int(seconds * 48000), np.float32), sample_rate=48000)
        return SimpleNamespace(model="yam", model_id="yamnet:builtin", embedding=alarm, window=window)

    not_like = NotLike()
    assert "glass-break" in not_like.matches([rule], scores(2.0))  # the bank's own window length
    caplog.set_level(logging.WARNING, logger="monitord")
    assert not_like.matches([rule], scores(1.0)) == {}
    assert not_like.matches([rule], scores(1.0)) == {}
    assert len([r for r in caplog.records if "1 s" in r.getMessage()]) == 1  # said once


def test_a_window_with_no_embedding_to_speak_of_scores_zero_not_the_decision_boundary():
    """An all-zero (or non-finite) window embedding has cosine 0 to everything: s_pos == s_neg, so
    every label scored exactly sigmoid(0) = 0.5, which a threshold of 0.5 (the README's "more like L
    than like anything else") takes as reached: silence alerted on every taught label. No evidence is 0."""
    rng = np.random.default_rng(3)
    bank = Bank.empty(YAM).add(rng.random((4, 1024)), "dog", [f"file:/d{i}.wav@0" for i in range(4)])
    bank = bank.add(rng.random((4, 1024)), "cat", [f"file:/c{i}.wav@0" for i in range(4)])
    calibrated = calibrate(bank, ["dog", "cat"], k=3)
    x = np.stack([np.zeros(1024, np.float32), np.full(1024, np.nan, np.float32), unit(rng.random(1024))])
    scores = calibrated.score(x)
    for label in ("dog", "cat"):
        assert scores[label][0] == 0.0 and scores[label][1] == 0.0, scores[label]
        assert 0.0 < scores[label][2] < 1.0


def test_calibrating_a_label_taught_from_hours_of_sound_stays_small():
    """calibrate() built a P x P similarity matrix (and P x O against the rest): a label taught from
    a 3 h recording (21600 windows at a 0.5 s hop) took 1.9 GB and ~20 s of the inference thread,
    at every change of the bank; MAX_EXAMPLES (200000) would take 160 GB. It is a sample now, a few
    rows at a time; small labels are calibrated exactly as before."""
    import tracemalloc

    rng = np.random.default_rng(5)
    dim = 16
    embedder = Embedder("yamnet:builtin", dim, 16000, 2.0)
    small = Bank.empty(embedder).add(rng.random((40, dim)), "a", [f"file:/r{i % 5}.wav@{i}" for i in range(40)])
    small = small.add(rng.random((30, dim)), "b", [f"file:/s{i % 3}.wav@{i}" for i in range(30)])
    exact = calibrate(small, ["a", "b"], 3)
    assert all(exact.labels[label].temperature > 0 for label in ("a", "b"))
    p = 6000
    big = Bank.empty(embedder).add(rng.random((p, dim)), "a", [f"file:/r{i % 7}.wav@{i}" for i in range(p)])
    big = big.add(rng.random((p, dim)), "b", [f"file:/s{i % 7}.wav@{i}" for i in range(p)])
    tracemalloc.start()
    try:
        calibrated = calibrate(big, ["a", "b"], 5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40 * 2**20, f"{peak / 2**20:.0f} MB"  # a 6000 x 6000 float32 matrix alone is 137 MB
    assert 0 < calibrated.labels["a"].temperature < 1


# --- the examples model on real recordings ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_windows():
    """Every window (2 s every 0.5 s, gate passed) of the non-speech recordings, YAMNet-embedded."""
    from monitord.inference.build import load_models
    from monitord.teaching.teach import cut_file, embed

    shared_path(AUDIO)
    config = load_config(write_config(Path(__import__("tempfile").mkdtemp())))
    yam = load_models(config, only={"yam"})["yam"]
    rows = []
    for label in NON_SPEECH:
        for path in sorted((AUDIO / label).glob("*.wav")):
            cuts = cut_file(config, path, yam)
            for cut, e in zip(cuts, embed(yam, cuts)):
                rows.append((label, str(path), cut.window.start_index / cut.window.sample_rate, e))
    return rows


def k_shot_accuracy(rows, k: int, seed: int) -> float:
    """Each test window classified by a bank of k windows per class that share no audio with it
    (other recordings of its class where there are, else windows of its recording at least a window away)."""
    rng = np.random.default_rng(seed)
    right = total = 0
    for label, path, start, e in rows:
        bank = Bank.empty(YAM)
        pools = {other: [r for r in rows if r[0] == other and (r[1] != path or abs(r[2] - start) >= 2.0)]
                 for other in NON_SPEECH}
        if any(r[1] != path for r in pools[label]):
            pools[label] = [r for r in pools[label] if r[1] != path]
        if not pools[label]:
            continue  # a window in the middle of a short recording: nothing of its class shares no audio with it
        for other, pool in pools.items():
            if not pool:
                continue
            pick = rng.choice(len(pool), size=min(k, len(pool)), replace=False)
            bank = bank.add(np.stack([pool[j][3] for j in pick]), other, [f"file:{pool[j][1]}@{pool[j][2]}" for j in pick])
        scores = calibrate(bank, NON_SPEECH, k=min(k, 3)).score(e[None])
        right += max(scores, key=lambda name: scores[name][0]) == label
        total += 1
    return right / total


def test_examples_k_shot_on_real_recordings_is_far_above_chance(real_windows):
    chance = 1 / len(NON_SPEECH)
    one, five = k_shot_accuracy(real_windows, 1, 0), k_shot_accuracy(real_windows, 5, 0)
    print(f"[teach] k-shot accuracy, {len(NON_SPEECH)} non-speech classes, {len(real_windows)} windows: "
          f"k=1 {one:.2f}, k=5 {five:.2f} (chance {chance:.2f})")
    assert one >= 0.5 and five >= 0.6


def test_calibration_gives_its_own_examples_about_the_same_score_for_every_label(real_windows):
    by_label = {}
    for label, path, start, e in real_windows:
        by_label.setdefault(label, []).append((path, start, e))
    bank = Bank.empty(YAM)
    for label, items in by_label.items():
        train = [it for it in items if it[1] <= 1.0]
        bank = bank.add(np.stack([it[2] for it in train]), label, [f"file:{it[0]}@{it[1]}" for it in train])
    model = calibrate(bank, NON_SPEECH, k=3)
    held_out = {label: [it for it in items if it[1] >= 3.0] for label, items in by_label.items()}
    medians = {label: float(np.median(model.score(np.stack([it[2] for it in items]))[label]))
               for label, items in held_out.items() if items}
    print("[teach] held-out median score of the true label:", {k: round(v, 2) for k, v in medians.items()})
    assert np.median(list(medians.values())) > 0.5  # held-out windows of a label mostly score above 0.5


# --- monitord teach, and the daemon -----------------------------------------------------------------------------------

def teach_cli(config: Path, bank: str, *args: str) -> tuple[int, str]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["teach", "-c", str(config), "--bank", str(config.parent / bank), *args])
    return code, out.getvalue()


def test_teach_cli_end_to_end_on_real_recordings(tmp_path, capsys):
    shared_path(AUDIO)
    config = write_config(tmp_path)
    code, out = teach_cli(config, "taught.npz", "--label", "thunder", "--files", str(THUNDER_OTHER))
    assert code == 0, capsys.readouterr().err
    summary = json.loads(out)
    assert summary["label"] == "thunder" and summary["added"] >= 5 and summary["model"] == "yamnet:builtin"
    assert teach_cli(config, "taught.npz", "--label", "applause", "--files", str(AUDIO / "applause"))[0] == 0
    code, listing = teach_cli(config, "taught.npz", "--list")
    assert code == 0 and "applause" in listing and f"file:{THUNDER_OTHER}@0.000" in listing
    bank = load(tmp_path / "taught.npz")
    assert set(bank.labels.tolist()) == {"thunder", "applause"} and stat.S_IMODE(os.stat(tmp_path / "taught.npz").st_mode) == 0o600
    # the examples model of this config scores a new thunder recording as thunder
    from monitord.inference.build import load_models
    from monitord.teaching.teach import cut_file

    models = load_models(load_config(config))
    cuts = cut_file(load_config(config), THUNDER, models["yam"])[:2]  # the thunderclap at its start
    upstream = models["yam"].score([c.window for c in cuts])
    scored = models["taught"].score([c.window for c in cuts], upstream)
    assert all(s.probabilities["thunder"] > 0.5 > s.probabilities["applause"] for s in scored)
    # forget, refuse, fail clearly
    assert teach_cli(config, "taught.npz", "--forget", "1", "2")[0] == 0
    assert len(load(tmp_path / "taught.npz")) == len(bank) - 2
    assert teach_cli(config, "taught.npz", "--forget", "1")[0] == 2
    assert "no example with id 1" in capsys.readouterr().err
    assert teach_cli(config, "x.npz", "--not", "no-such-rule", "--files", str(THUNDER))[0] == 2
    assert "no rule 'no-such-rule'" in capsys.readouterr().err
    other = write_config(tmp_path / "other", seconds=1.0) if (tmp_path / "other").mkdir() is None else None
    (tmp_path / "other" / "taught.npz").write_bytes((tmp_path / "taught.npz").read_bytes())
    assert teach_cli(other, "taught.npz", "--label", "thunder", "--files", str(THUNDER))[0] == 2
    assert "2 s windows at 16000 Hz, not 1 s" in capsys.readouterr().err
    (tmp_path / "garbage.npz").write_bytes(b"garbage")
    assert teach_cli(config, "garbage.npz", "--list")[0] == 2
    assert "is not a monitord bank" in capsys.readouterr().err


def test_a_running_daemon_stops_raising_a_taught_false_alarm_at_once_while_the_target_still_does(tmp_path):
    """One live (paced) stream: thunder, thunder again, applause. The rule fires on thunder (a false
    alarm here) and on applause (its target). While the daemon runs, the first alert is taught as
    not:loud from a *different* thunder recording; the second thunder no longer raises the rule (a
    suppressed status event names the example), the applause still does. No restart, no reload."""
    from monitord.audio import read_mono
    from tests.conftest import wait_until, write_wav

    shared_path(AUDIO)
    parts = [read_mono(path) for path in (THUNDER, THUNDER, APPLAUSE)]
    rate = parts[0][1]
    assert all(r == rate for _, r in parts)
    gap = np.zeros(2 * rate, np.float32)
    stream = np.concatenate([np.concatenate([x, gap]) for x, _ in parts])
    write_wav(tmp_path / "stream.wav", stream.astype(np.float32), rate)
    config = write_config(tmp_path)
    text = config.read_text().replace("  - id: applause\n    file: " + str(APPLAUSE) + "\n", "")
    config.write_text(text.replace("file: " + str(THUNDER), f"file: {tmp_path / 'stream.wav'}\n    realtime: true"))
    log = tmp_path / "events.jsonl"
    events = lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []  # noqa: E731
    onsets = lambda: [e for e in events() if e["kind"] == "alert" and e["phase"] == "onset"]  # noqa: E731
    daemon = subprocess.Popen([sys.executable, "-m", "monitord", "run", "-c", str(config), "--until-done"], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: onsets(), 60), "the rule never fired on the first thunder"
        first = onsets()[0]
        assert first["stream_end"] < 8.0  # the first thunder (0-6 s), not a later one
        code, _ = teach_cli(config, "loud-not.npz", "--not", "loud", "--files", str(THUNDER_OTHER))
        assert code == 0
        from datetime import datetime

        started = datetime.fromisoformat(first["time"].replace("Z", "+00:00")).timestamp() - first["stream_start"]
        taught_at = time.time() - started  # stream time now: the source is paced in real time
        assert taught_at < 8.0, f"teaching took too long: the stream was at {taught_at:.1f} s, in the second thunder"
        _, err = daemon.communicate(timeout=120)
        assert daemon.returncode == 0, err[-2000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
    # windows overlapping the second thunder (8-14 s) start in (6, 14); the applause's (16-22 s) in (14, 22)
    later = [e["stream_start"] for e in onsets() if e["stream_start"] > 6.0]
    assert len(later) == 1 and later[0] >= 14.0, later  # only the applause
    suppressed = [e for e in events() if e.get("status") == "suppressed"]
    assert suppressed and all(e["rule"] == "loud" and 6.0 < e["stream_start"] < 14.0 for e in suppressed)
    assert suppressed[0]["suppressed_by"]["source"].startswith(f"file:{THUNDER_OTHER}@")
    assert suppressed[0]["suppressed_by"]["distance"] <= 0.35


def test_eval_reports_a_rules_events_and_false_alarms_with_and_without_its_bank(tmp_path):
    """Applause is the rule's target, thunder a false alarm taught from another thunder recording."""
    shared_path(AUDIO)
    config = write_config(tmp_path)
    for label, path in (("loud", APPLAUSE), ("background", THUNDER), ("background", AUDIO / "rain" / "rain.wav")):
        (tmp_path / "data" / label).mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / label / path.name).symlink_to(path)
    assert teach_cli(config, "loud-not.npz", "--not", "loud", "--files", str(THUNDER_OTHER))[0] == 0
    assert main(["eval", str(tmp_path / "data"), "-c", str(config), "--model", "yam", "--out", str(tmp_path / "ev")]) == 0
    rule = json.loads((tmp_path / "ev" / "eval.json").read_text())["rules"]["loud"]
    assert rule["without_bank"]["events_detected"] == rule["with_bank"]["events_detected"] == 1
    assert rule["without_bank"]["false_alarms_per_hour"] > 0 == rule["with_bank"]["false_alarms_per_hour"]


def test_no_label_a_rule_can_be_taught_under_names_another_rules_false_alarms(tmp_path):
    """A bank keeps rule r's false alarms under ``not:r``. A CLAP label or YAMNet group spelled so
    would let "yes, this" on its own rule teach r's false alarm, and a real glass break alike
    would then be suppressed: the config names it instead."""
    from tests.conftest import config_problems

    config = """
sources: [{id: a, device: default}]
models:
  clap: {kind: clap, model: x, labels: [glass breaking, "not:glass-break", noise]}
  yam: {kind: yamnet, groups: {"not:glass": [Glass]}}
rules:
  - {id: glass-break, model: clap, label: glass breaking, threshold: 0.5, not_like: {bank: taught.npz}}
  - {id: odd, model: clap, label: "not:glass-break", threshold: 0.5, not_like: {bank: taught.npz}}
"""
    problems = "\n".join(config_problems(config, tmp_path))
    assert "models.clap.labels: 'not:glass-break' may not start with 'not:'" in problems, problems
    assert "models.yam.groups.not:glass: 'not:glass' may not start with 'not:'" in problems, problems


def test_config_checks_for_taught_models_and_not_like(tmp_path):
    from tests.conftest import config_problems

    base = """
sources: [{id: a, device: default}]
models:
  yam: {kind: yamnet}
  emo: {kind: emotion, model: x}
  taught: {kind: examples, bank: b.npz, labels: [kettle, "not:kettle"], embedding_model: %s}
rules:
  - {id: r, model: emo, label: angry, threshold: 0.5, not_like: {bank: n.npz}}
  - {id: k, model: taught, label: kettel, threshold: 0.5}
"""
    problems = "\n".join(config_problems(base % "emo", tmp_path))
    assert "models.taught.embedding_model: 'emo' is not a yamnet or clap model" in problems
    assert "'not:kettle' is not a label to teach" in problems
    assert "rules.0.not_like: needs a window rule on a yamnet, clap or examples model" in problems
    assert "rules.1.label" in problems and "kettle" in problems  # a typo names the nearest taught label
    ok = base.replace(', "not:kettle"', "").replace("kettel", "kettle").replace("model: emo, label: angry", "model: yam, label: Glass") % "yam"
    from monitord.config import parse_config

    config = parse_config(ok, tmp_path)
    from monitord.config.schema import MARGIN_WITHOUT_REFERENCE

    # the default margin of a rule with no reference recordings: the one the detection benchmark chose
    assert config.rules[0].not_like.bank == str(tmp_path / "n.npz") and config.rules[0].not_like.margin == MARGIN_WITHOUT_REFERENCE
    assert config.models["taught"].bank == str(tmp_path / "b.npz")


def test_examples_on_clap_embeddings_and_a_yamnet_bank_refused(tmp_path, random_clap):
    """`embedding_model: clap` uses CLAP's audio embedding; a bank of YAMNet embeddings is refused,
    saying why (a tiny CLAP with random weights: only the mechanism is tested)."""
    from monitord.inference.build import load_models
    from monitord.inference.models import ModelUnavailable
    from tests.conftest import noise, tone, write_wav

    for name, audio in (("tone", tone(440, 4.0, 48000)), ("noise", noise(4.0, 48000, -20.0))):
        write_wav(tmp_path / f"{name}.wav", audio, 48000)
    config = tmp_path / "clap.yaml"
    config.write_text(f"""
sources: [{{id: a, device: default}}]
models:
  clap: {{model: {random_clap}, labels: [tone, noise], device: cpu, dtype: float32}}
  taught: {{kind: examples, bank: taught.npz, labels: [beep, hiss], embedding_model: clap}}
""")
    assert teach_cli(config, "taught.npz", "--label", "beep", "--files", str(tmp_path / "tone.wav"))[0] == 0
    assert teach_cli(config, "taught.npz", "--label", "hiss", "--files", str(tmp_path / "noise.wav"))[0] == 0
    bank = load(tmp_path / "taught.npz")
    assert bank.embedder.model_id == str(random_clap) and bank.embedder.sample_rate == 48000 and bank.embedder.dim == 16
    models = load_models(load_config(config))
    from monitord.teaching.teach import cut_file

    cuts = cut_file(load_config(config), tmp_path / "tone.wav", models["clap"])[:1]
    scored = models["taught"].score([c.window for c in cuts], models["clap"].score([c.window for c in cuts]))
    assert scored[0].probabilities["beep"] > scored[0].probabilities["hiss"]
    save(a_bank(), tmp_path / "taught.npz")  # YAMNet embeddings where CLAP's are expected
    with pytest.raises(ModelUnavailable, match=r"holds embeddings of yamnet:builtin \(1024-d\), not .*clap"):
        load_models(load_config(config))


def test_teach_from_a_logged_event_takes_the_alerting_window_of_its_clip(tmp_path, capsys):
    from monitord.audio import read_mono
    from monitord.types import Event
    from tests.conftest import write_wav

    shared_path(AUDIO)
    config = write_config(tmp_path)
    samples, rate = read_mono(THUNDER_OTHER)
    clip = write_wav(tmp_path / "clip.wav", samples, rate)  # a clip as the daemon writes them: pre_s (2 s) before the window
    event = Event(kind="alert", source="thunder", time="2026-12-03T00:00:00.000Z", host="h", rule="loud", label="loud",
                  phase="onset", clip=str(clip))
    no_clip = Event(kind="alert", source="thunder", time="2026-12-03T00:00:01.000Z", host="h", rule="loud", label="loud",
                    phase="offset")
    (tmp_path / "events.jsonl").write_text(event.with_sequence(5, "a", None).to_json() + "\n"
                                           + no_clip.with_sequence(6, "b", None).to_json() + "\n")
    code, out = teach_cli(config, "loud-not.npz", "--not", "loud", "--from-event", "5")
    assert code == 0, capsys.readouterr().err
    bank = load(tmp_path / "loud-not.npz")
    assert json.loads(out)["added"] == 1 and bank.labels.tolist() == ["not:loud"]
    assert bank.sources.tolist() == [f"event:5:a:clip:{clip}@2.000"]
    code, _ = teach_cli(config, "loud-not.npz", "--not", "loud", "--from-clip", str(clip))
    assert code == 0 and load(tmp_path / "loud-not.npz").sources.tolist()[-1] == f"clip:{clip}@2.000"
    np.testing.assert_allclose(*load(tmp_path / "loud-not.npz").embeddings, atol=1e-6)  # the same window, both ways
    assert teach_cli(config, "loud-not.npz", "--not", "loud", "--from-event", "6")[0] == 2
    assert "event 6 has no clip" in capsys.readouterr().err
    assert teach_cli(config, "loud-not.npz", "--not", "loud", "--from-event", "99")[0] == 2
    assert "no event 99" in capsys.readouterr().err


def test_teach_from_event_refuses_an_event_of_another_rule_or_no_onset(tmp_path, capsys):
    """`--not loud --from-event SEQ` took any logged event with a clip: an alert of another rule
    (a true alarm of it, say) went into loud's bank as loud's false alarm. The dashboard's and
    MQTT's feedback refuse that; so does the CLI now, before loading any model."""
    from monitord.types import Event
    from tests.conftest import noise, write_wav

    shared_path(AUDIO)
    config = write_config(tmp_path)
    clip = write_wav(tmp_path / "clip.wav", noise(6.0, 16000, dbfs=-12, seed=1), 16000)
    base = dict(kind="alert", source="thunder", time="2026-12-03T00:00:00.000Z", host="h", label="loud", clip=str(clip))
    lines = [Event(rule="smoke", phase="onset", **base).with_sequence(5, "a", None),
             Event(rule="loud", phase="offset", **base).with_sequence(6, "b", None)]
    (tmp_path / "events.jsonl").write_text("".join(e.to_json() + "\n" for e in lines))
    assert teach_cli(config, "loud-not.npz", "--not", "loud", "--from-event", "5")[0] == 2
    assert "no alert onset of rule loud" in capsys.readouterr().err
    assert teach_cli(config, "loud-not.npz", "--not", "loud", "--from-event", "6")[0] == 2
    assert "no alert onset of rule loud" in capsys.readouterr().err
    assert not (tmp_path / "loud-not.npz").exists()


def test_an_examples_models_labels_change_with_a_reload(tmp_path):
    from monitord.config import ExamplesModelConfig

    from monitord.inference.models.examples import ExamplesModel

    save(a_bank(), tmp_path / "b.npz")
    embedder = SimpleNamespace(sample_rate=16000, model_id="yamnet:builtin")
    model = ExamplesModel("taught", ExamplesModelConfig(kind="examples", bank=str(tmp_path / "b.npz"), labels=["kettle"],
                                                        embedding_model="yam"), embedder, 2.0)
    window = SimpleNamespace()
    up = [SimpleNamespace(embedding=a_bank().embeddings[0])]
    assert set(model.score([window], up)[0].probabilities) == {"kettle"}
    assert model.score([window], up)[0].probabilities["kettle"] == 0.0  # not taught yet
    model.use_labels(model.prepare_labels(["kettle", "glass"], ""))
    probabilities = model.score([window], up)[0].probabilities
    assert probabilities["kettle"] == 0.0 and probabilities["glass"] > 0.5  # one of glass's own examples
