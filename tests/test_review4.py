"""Review 4 of issue #24 (recall-safe "not this"): failing tests that pin what the review found.

Each test says what it shows; they are small (single rule, fake or tiny embeddings where they can).
"""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import silence, write_wav


def _rule(bank: Path, reference: str | None = "glass", margin: float = 0.3):
    return SimpleNamespace(id="r", model="yam", label="l", sources=None,
                           not_like=SimpleNamespace(bank=str(bank), margin=margin, reference=reference))


def _bank(folder: Path, dim: int = 4) -> tuple[Path, np.ndarray]:
    from monitord.teaching.bank import Bank, Embedder, save

    e = np.ones(dim, np.float32) / np.sqrt(dim)
    path = folder / "b.npz"
    save(Bank.empty(Embedder("m", dim, 16000, 2.0)).add(e[None], "not:r", ["x@0"]), path)
    return path, e


# 1 --------------------------------------------------------------------------------------------------------------------

def test_references_of_another_embedder_never_crash_the_alerts_stage(tmp_path):
    """NotLike trusts ``references[rule.id]`` to be embeddings of the window's model. They are not after a
    reload that moves a rule to another model: swap() assigns the new config's references on the inference
    thread *before* the alerts stage has taken the RulesChange, so windows already queued are judged by the
    old rule (old model, old bank) against the new model's references. A cache file of another dimension in
    the state dir does the same. Today np.concatenate raises ValueError in the alerts thread: the stage dies
    on every window, and after three deaths in 10 min the daemon exits (fatal). Expected: nothing suppressed
    (and a warning), never an exception."""
    from monitord.teaching.suppress import NotLike
    from monitord.types import Scores

    bank, e = _bank(tmp_path, 4)
    not_like = NotLike()
    not_like.references = {"r": SimpleNamespace(embeddings=np.eye(3, dtype=np.float32))}  # another model's: 3-d
    scores = Scores(window=None, model="yam", model_id="m", probabilities={"l": 0.9}, embedding=e)
    assert not_like.matches([_rule(bank)], scores) == {}


# 2 --------------------------------------------------------------------------------------------------------------------

def test_an_empty_cached_reference_file_is_not_taken_as_embedded_references(tmp_path):
    """``cached`` accepts a (0, D) file (a truncated run, a tampered state dir): the rule is then taken as
    guarded by references that hold nothing, so ``judge`` gets no positives and every window within the
    margin of a taught false alarm is suppressed, whatever it is nearer to. Expected: such a file is not a
    cache (None: the references are embedded again, and until then nothing is suppressed)."""
    from monitord.config import parse_config
    from monitord.teaching.references import cache_key, cached

    write_wav(tmp_path / "x.wav", silence(1.0, 16000), 16000)
    config = parse_config("sources: [{id: a, file: x.wav}]\nmodels: {yam: {kind: yamnet}}\n"
                          "rules: [{id: r, model: yam, label: Glass, threshold: 0.3, not_like: {reference: glass}}]\n",
                          tmp_path)
    embedder = SimpleNamespace(name="yam", model_id="yamnet-x", sample_rate=16000)
    folder = tmp_path / "refs"
    folder.mkdir()
    np.savez(folder / f"{cache_key(config, embedder, 'glass')}.npz", embeddings=np.zeros((0, 1024), np.float32),
             recordings=np.zeros(0, str))
    assert cached(config, embedder, "glass", folder) is None


def test_a_cached_reference_file_of_rows_that_are_not_unit_vectors_is_not_used(tmp_path):
    """Rows of norm 10 put every window at distance 1 - 10 cos: the guard then decides by their scale, not
    by nearness (here: a window that *is* a reference, scaled down, is not protected)."""
    from monitord.config import parse_config
    from monitord.teaching.references import cache_key, cached

    write_wav(tmp_path / "x.wav", silence(1.0, 16000), 16000)
    config = parse_config("sources: [{id: a, file: x.wav}]\nmodels: {yam: {kind: yamnet}}\n"
                          "rules: [{id: r, model: yam, label: Glass, threshold: 0.3, not_like: {reference: glass}}]\n",
                          tmp_path)
    embedder = SimpleNamespace(name="yam", model_id="yamnet-x", sample_rate=16000)
    folder = tmp_path / "refs"
    folder.mkdir()
    rows = np.full((2, 4), -5.0, np.float32)  # norm 10, pointing away from everything
    np.savez(folder / f"{cache_key(config, embedder, 'glass')}.npz", embeddings=rows, recordings=np.array(["a", "b"]))
    found = cached(config, embedder, "glass", folder)
    assert found is None or np.allclose(np.linalg.norm(found.embeddings, axis=1), 1.0, atol=1e-3)


# 3 --------------------------------------------------------------------------------------------------------------------

def test_a_reference_folder_is_cut_within_bounded_memory(tmp_path, monkeypatch):
    """``windows`` reads every recording, makes four rooms of each and cuts *every* window before it
    keeps MAX_WINDOWS of them: 2 minutes of reference audio peak at ~190 MB (about 1.6 MB per second of
    audio), so a folder holding an hour of recordings needs ~6 GB at start (on a Pi: the OOM killer), however
    small MAX_WINDOWS is. Expected: memory bounded by the windows kept (subsample per recording, or cap the
    audio read), not by the folder."""
    from monitord.config import parse_config
    from monitord.teaching import references

    refs = tmp_path / "refs"
    refs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        write_wav(refs / f"r{i}.wav", (0.1 * rng.standard_normal(16000 * 20)).astype(np.float32), 16000)
    write_wav(tmp_path / "x.wav", silence(1.0, 16000), 16000)
    config = parse_config("sources: [{id: a, file: x.wav}]\nmodels: {yam: {kind: yamnet}}\n"
                          f"rules: [{{id: r, model: yam, label: Glass, threshold: 0.3, not_like: {{reference: {refs}}}}}]\n",
                          tmp_path)
    monkeypatch.setattr(references, "MAX_WINDOWS", 10)
    embedder = SimpleNamespace(name="yam", model_id="m", sample_rate=16000)
    tracemalloc.start()
    try:
        cut, _ = references.windows(config, embedder, str(refs))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(cut) == 10
    assert peak < 40e6, f"{peak / 1e6:.0f} MB to keep 10 windows of 2 s"


# 4 --------------------------------------------------------------------------------------------------------------------

def _daemon_config(folder: Path, rules: str, extra: str = "") -> Path:
    from tests.conftest import free_port

    write_wav(folder / "x.wav", silence(1.0, 16000), 16000)
    config = folder / "monitord.yaml"
    config.write_text(f"""
sources: [{{id: a, file: x.wav, realtime: true}}]
models: {{yam: {{kind: yamnet}}}}
rules:
{rules}
publish: {{endpoint: "tcp://127.0.0.1:{free_port()}", event_log: events.jsonl}}
{extra}
""")
    return config


def _wait_jobs(daemon, seconds: float) -> None:
    """Until the inference stage has no job waiting or running (nor a batch in hand)."""
    from tests.conftest import wait_until

    wait_until(lambda: daemon.inference.idle, seconds)


def _started(config: Path):
    """A daemon on ``config``, its stages started (no source opened: nothing is played)."""
    from monitord.config import load_config
    from monitord.daemon import Daemon
    from monitord.inference.build import load_models

    loaded = load_config(config)
    daemon = Daemon(loaded, load_models(loaded))
    daemon.start(open_sources=False)
    return daemon


def _wait_references(daemon, rule: str, seconds: float) -> bool:
    from tests.conftest import wait_until

    return wait_until(lambda: rule in daemon.alerts.not_like.references, seconds)


def test_one_unreadable_reference_does_not_take_away_another_rules_references(tmp_path, monkeypatch):
    """A live daemon embeds references on the inference thread with ``for_rules`` over all rules, which raises
    on the first unreadable one (a file that is no audio in a folder of one's own: ``check-config`` passes it, it checks
    only that the folder holds files). The error is logged and *no* rule gets its references: the glass rule's
    taught false alarms then silently suppress nothing, though its references (shipped) are fine."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    own = tmp_path / "own"
    own.mkdir()
    (own / "doorbell.wav").write_text("not audio: a file that claims to be one\n")
    config = _daemon_config(tmp_path, """
  - {id: glass, model: yam, label: Glass, threshold: 0.3, not_like: {bank: g.npz, reference: glass}}
  - {id: bell, model: yam, label: Doorbell, threshold: 0.3, not_like: {bank: b.npz, reference: own}}
""")
    daemon = _started(config)
    try:
        assert _wait_references(daemon, "glass", 30), "the glass rule lost its references to the bell's folder"
    finally:
        daemon.stop(drain_timeout_s=1)


def test_embedding_references_at_start_does_not_stall_the_inference_stage(tmp_path, monkeypatch):
    """The references not cached yet are embedded by one URGENT job on the inference thread, which does not
    beat while it runs and scores no window: live sound is not scored (windows dropped) and the stage is
    unhealthy once the job outlasts ``inference_stall_s`` (60 s by default; the systemd watchdog is 120 s).
    Measured here: 60 windows of the shipped glass take ~0.9 s with YAMNet on this machine, so a folder of
    one's own (MAX_WINDOWS = 2000 windows) takes ~30 s here, minutes on a Pi or with CLAP: the watchdog
    kills monitord before the cache is written, and the next start embeds again (a restart loop).
    Shown with a small bound (3 s) and ~4 minutes of reference audio (2000 windows, ~30 s here)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    own = tmp_path / "own"
    own.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        write_wav(own / f"r{i}.wav", (0.1 * rng.standard_normal(16000 * 60)).astype(np.float32), 16000)
    config = _daemon_config(tmp_path, """
  - {id: bell, model: yam, label: Doorbell, threshold: 0.3, not_like: {bank: b.npz, reference: own}}
""", extra="pipeline: {inference_stall_s: 3.0}\n")
    daemon = _started(config)
    unhealthy = []
    try:
        end = time.monotonic() + 20
        while time.monotonic() < end:
            health = daemon.health()["inference"]
            if not health.ok:
                unhealthy.append(health.reason)
                break
            if "bell" in daemon.alerts.not_like.references:
                break
            time.sleep(0.1)
    finally:
        daemon.stop(drain_timeout_s=1)
    assert not unhealthy, f"the inference stage stalled while embedding references: {unhealthy[0]}"


# 5 --------------------------------------------------------------------------------------------------------------------

def test_a_rules_references_are_used_only_for_the_reference_it_names(tmp_path):
    """A reload swaps ``references`` (keyed by rule id) on the inference thread before the alerts stage takes
    the new rules: windows already queued are judged by the old rule (``reference: glass``) against the new
    config's references (``smoke-alarm``), and a glass break among them is guarded by alarm beeps. The
    References know their name: a rule should use them only when it is the reference it names."""
    from monitord.teaching.suppress import NotLike
    from monitord.types import Scores

    bank, e = _bank(tmp_path, 4)
    not_like = NotLike()
    far = -e[None]  # a positive far from the window: with it the window is suppressed
    not_like.references = {"r": SimpleNamespace(name="smoke-alarm", embeddings=far)}
    scores = Scores(window=None, model="yam", model_id="m", probabilities={"l": 0.9}, embedding=e)
    assert not_like.matches([_rule(bank, reference="glass")], scores) == {}  # not its references: not ready
    not_like.references = {"r": SimpleNamespace(name="glass", embeddings=far)}
    assert set(not_like.matches([_rule(bank, reference="glass")], scores)) == {"r"}


def test_a_reload_naming_a_reference_that_holds_no_recordings_is_refused_before_anything_is_swapped(tmp_path,
                                                                                                     monkeypatch):
    """Today the reference is first looked at inside swap(), on the inference thread, after new weights and
    labels were swapped in: the reload is refused, but half applied, and the message blames the labels
    ("the new labels could not be swapped in: ReferenceUnreadable(...)")."""
    from monitord.config import load_config
    from monitord.daemon import ReloadError

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    config = _daemon_config(tmp_path, """
  - {id: glass, model: yam, label: Glass, threshold: 0.3, not_like: {bank: g.npz, reference: glass}}
""")
    daemon = _started(config)
    swapped = []
    try:
        _wait_references(daemon, "glass", 30)  # embedded at start
        _wait_jobs(daemon, 30)
        config.write_text(config.read_text().replace("reference: glass", "reference: nowhere"))
        real_submit = daemon.inference.submit
        monkeypatch.setattr(daemon.inference, "submit", lambda fn, *a, **k: swapped.append(fn) or real_submit(fn, *a, **k))
        with pytest.raises(ReloadError) as refused:
            daemon.reload(load_config(config))
    finally:
        daemon.stop(drain_timeout_s=1)
    assert "labels" not in str(refused.value) and "nowhere" in str(refused.value)
    assert not swapped, "the swap was submitted (new weights and labels go in) before the reference was checked"


# 6 --------------------------------------------------------------------------------------------------------------------

def test_classify_rules_with_an_unreadable_reference_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    """``monitord classify --rules`` embeds the references with ``for_rules`` and does not catch
    ReferenceUnreadable: a file that is no audio beside one's recordings ends it in a traceback (exit 1); ``run`` says
    the same thing in one line (exit 2). ``check-config`` passes that folder (it only looks for files)."""
    from monitord.cli import main

    own = tmp_path / "own"
    own.mkdir()
    (own / "doorbell.wav").write_text("not audio: a file that claims to be one\n")
    write_wav(tmp_path / "x.wav", silence(1.0, 16000), 16000)
    config = tmp_path / "m.yaml"
    config.write_text("sources: [{id: a, file: x.wav}]\nmodels: {yam: {kind: yamnet}}\n"
                      "rules: [{id: bell, model: yam, label: Doorbell, threshold: 0.3, not_like: {bank: b.npz, reference: own}}]\n")
    code = main(["classify", "-c", str(config), "--rules", str(tmp_path / "x.wav")])
    assert code == 2 and "doorbell.wav" in capsys.readouterr().err


# 7 --------------------------------------------------------------------------------------------------------------------

def test_a_cached_reference_file_that_inflates_to_hundreds_of_megabytes_is_not_read(tmp_path):
    """``cached`` reads a .npz in the state dir whole (``allow_pickle=False`` stops object arrays, not size):
    a 0.4 MB deflated file of zeros becomes 400 MB (850 MB peak RSS measured), read at every start. Real
    references are at most MAX_WINDOWS rows: a member past that size should not be inflated at all."""
    import io
    import zipfile

    from monitord.config import parse_config
    from monitord.teaching.references import cache_key, cached

    write_wav(tmp_path / "x.wav", silence(1.0, 16000), 16000)
    config = parse_config("sources: [{id: a, file: x.wav}]\nmodels: {yam: {kind: yamnet}}\n"
                          "rules: [{id: r, model: yam, label: Glass, threshold: 0.3, not_like: {reference: glass}}]\n",
                          tmp_path)
    embedder = SimpleNamespace(name="yam", model_id="m", sample_rate=16000)
    path = tmp_path / f"{cache_key(config, embedder, 'glass')}.npz"
    rows = 100_000
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, array in (("embeddings.npy", np.full((rows, 1024), 1 / 32, np.float32)),
                            ("recordings.npy", np.full(rows, "a"))):
            buffer = io.BytesIO()
            np.save(buffer, array)
            z.writestr(name, buffer.getvalue())
    assert path.stat().st_size < 2e6
    tracemalloc.start()
    try:
        found = cached(config, embedder, "glass", tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert found is None and peak < 50e6, f"{peak / 1e6:.0f} MB read from a {path.stat().st_size / 1e6:.1f} MB file"


def test_a_damaged_cached_reference_file_is_embedded_again_not_a_crash_at_start(tmp_path):
    """A kept file that starts like a zip but is not one (a damaged disk, a copy cut short) raised
    zipfile.BadZipFile out of ``cached``, which Daemon.start calls: ``monitord run`` ended in a traceback at
    every start until the file was found and deleted."""
    from monitord.config import parse_config
    from monitord.teaching.references import cache_key, cached

    write_wav(tmp_path / "x.wav", silence(1.0, 16000), 16000)
    config = parse_config("sources: [{id: a, file: x.wav}]\nmodels: {yam: {kind: yamnet}}\n"
                          "rules: [{id: r, model: yam, label: Glass, threshold: 0.3, not_like: {reference: glass}}]\n",
                          tmp_path)
    embedder = SimpleNamespace(name="yam", model_id="m", sample_rate=16000)
    (tmp_path / f"{cache_key(config, embedder, 'glass')}.npz").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    assert cached(config, embedder, "glass", tmp_path) is None


def test_a_notice_or_readme_beside_ones_own_recordings_is_not_taken_for_one(tmp_path):
    """A folder of one's own recordings keeps their licence beside them (a NOTICE for CC BY): it is not
    read as audio (it failed ``run`` after ``check-config`` passed)."""
    from monitord.teaching.references import recordings

    own = tmp_path / "own"
    own.mkdir()
    (own / "NOTICE.md").write_text("recorded at home, CC BY 4.0\n")
    (own / "README").write_text("the doorbell, three takes\n")
    write_wav(own / "bell.wav", silence(1.0, 16000) + 0.1, 16000)
    assert [r.name for r in recordings(str(own))] == ["bell.wav"]
