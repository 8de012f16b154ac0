"""Review findings: each test fails on the code as it was reviewed (see the commit that adds it)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from monitord.alerts.engine import AlertEngine
from monitord.alerts.stage import AlertsStage
from monitord.config import RuleConfig
from monitord.stage import Channel
from monitord.types import (Event, Outcome, Publication, RulesChange, Scores, ScoredWindow, StageState, Verdict, Window,
                            WindowFacts)
from tests.conftest import time_scale, wait_until

RATE = 16000


def window(t: float, source: str = "k") -> Window:
    samples = np.zeros(RATE, dtype=np.float32)
    return Window(source, int(t * RATE), RATE, samples, RATE, 1000.0 + t, 1000.0 + t + 1,
                  WindowFacts(-20, -10, -25, 0.0, 0, 0.0))


def scored(t: float, score: float, model: str = "clap", label: str = "glass", source: str = "k") -> ScoredWindow:
    w = window(t, source)
    return ScoredWindow(w, (Outcome(model, Verdict.SCORED, Scores(w, model, model, {label: score, "other": 1 - score})),))


def rule(**kw) -> RuleConfig:
    return RuleConfig(**{**dict(id="r", model="clap", label="glass", threshold=0.6, release=0.4), **kw})


def run_alerts(items, rules) -> list[Event]:
    """An alerts stage fed ``items`` then closed; the events it handed on."""
    inbox, out = Channel(1000, "alerts"), Channel(1000, "output")
    stage = AlertsStage(AlertEngine(tuple(rules)), inbox, out, "host", {"clap": "clap-id"})
    for item in items:
        inbox.put(item)
    inbox.close()
    stage.start()
    assert stage.join(5)
    return [p.event for p in out.drain() if isinstance(p, Publication)]


def test_a_reload_that_changes_a_rule_mid_alert_publishes_the_offset():
    """SIGHUP changing an active rule ends its alert in the engine ("rule changed"), but the stage
    publishes those transitions with no window and drops them: the onset never gets its offset."""
    events = run_alerts([scored(1.0, 0.9), RulesChange((rule(threshold=0.7),)), scored(1.5, 0.1)], [rule()])
    phases = [(e.phase, e.extra.get("reason")) for e in events if e.kind == "alert"]
    assert phases == [("onset", None), ("offset", "rule changed")], phases


def test_a_reload_that_removes_a_rule_mid_alert_publishes_the_offset():
    events = run_alerts([scored(1.0, 0.9), RulesChange(())], [rule()])
    phases = [e.phase for e in events if e.kind == "alert"]
    assert phases.count("onset") == phases.count("offset") == 1, phases


def framed(t: float, score: float, model: str = "clap", label: str = "glass") -> ScoredWindow:
    from monitord.types import FrameScores

    w = window(t)
    n = 50  # 1 s of 20 ms frames
    values = np.tile(np.array([[score, 1 - score]], dtype=np.float32), (n, 1))
    frames = FrameScores(t + 0.01, 0.02, values)
    return ScoredWindow(w, (Outcome(model, Verdict.SCORED, Scores(w, model, model, {label: score, "other": 1 - score},
                                                                  frames=frames)),))


def test_a_reload_that_changes_a_frame_rule_mid_alert_publishes_the_offset():
    rules = [rule(hold_s=0.1)]
    items = [framed(t, 0.9) for t in (0.0, 0.5, 1.0, 1.5, 2.0)] + [RulesChange((rule(hold_s=0.2),))]
    events = run_alerts(items, rules)
    phases = [e.phase for e in events if e.kind == "alert"]
    assert "onset" in phases and phases.count("onset") == phases.count("offset"), phases


def test_a_reload_ending_alerts_on_two_sources_names_each_source():
    events = run_alerts([scored(1.0, 0.9, source="a"), scored(1.0, 0.9, source="b"), RulesChange(())], [rule()])
    assert sorted((e.source, e.phase) for e in events if e.kind == "alert") == \
        [("a", "offset"), ("a", "onset"), ("b", "offset"), ("b", "onset")]


@pytest.mark.parametrize("hostile", [b'{"since": Infinity}', b'{"since": 1, "limit": -Infinity}',
                                     b'[' * 2000 + b']' * 2000])  # nested past json's recursion limit, under the 4 KiB request cap
def test_a_hostile_replay_request_gets_an_error_and_the_replay_server_keeps_answering(tmp_path, hostile):
    """The replay thread dies on a request int() overflows on (or one json nests too deep), and
    nobody notices: it is no stage, the daemon stays healthy, and replay is gone until a restart."""
    import zmq

    from monitord.config import PublishConfig
    from monitord.output.publish import Publisher
    from tests.conftest import free_port

    endpoint, replay = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.Context()
    p = Publisher(PublishConfig(endpoint=endpoint, replay_endpoint=replay, event_log=str(tmp_path / "e.jsonl")), ctx)
    p.start()
    try:
        p.publish(Event(kind="status", source="s", time="t", host="h", status="up"))
        for request in (hostile, b'{"since": 0}'):
            req = ctx.socket(zmq.REQ)
            req.setsockopt(zmq.LINGER, 0)
            req.connect(replay)
            req.send(request)
            answered = req.poll(3000)
            reply = req.recv_multipart() if answered else None
            req.close()
            assert answered, f"no answer to {request[:40]!r}: the replay thread is {'alive' if p.replay._thread.is_alive() else 'dead'}"
        assert json.loads(reply[0])["count"] == 1
    finally:
        p.close()
        ctx.term()


def output_stage(tmp_path, feed=None, max_mb=None):
    import zmq

    from monitord.config import PublishConfig
    from monitord.output.publish import Publisher
    from monitord.output.stage import OutputStage
    from tests.conftest import free_port

    config = PublishConfig(endpoint=f"tcp://127.0.0.1:{free_port()}", event_log=str(tmp_path / "e.jsonl"),
                           event_log_max_mb=max_mb)
    publisher = Publisher(config, zmq.Context())
    publisher.start()
    inbox: Channel = Channel(100, "output")
    return OutputStage(inbox, publisher, "h", {}, feed=feed), inbox, publisher


def logged_seqs(tmp_path) -> list[int]:
    files = sorted(tmp_path.glob("e.jsonl*"), key=lambda f: (f.name == "e.jsonl", f.name), reverse=False)
    seqs = []
    for f in [*sorted((f for f in files if f.name != "e.jsonl"), key=lambda f: -int(f.suffix[1:])),
              *[f for f in files if f.name == "e.jsonl"]]:
        for line in f.read_bytes().splitlines():
            try:
                seqs.append(json.loads(line)["seq"])
            except ValueError:
                pass
    return seqs


def status_publication(n: int) -> Publication:
    return Publication(Event(kind="status", source="s", time="t", host="h", status="up", detail=str(n)))


def test_an_fsync_error_while_rotating_the_log_neither_duplicates_an_event_nor_kills_the_output_stage(tmp_path, monkeypatch):
    """Rotation closes the file with an fsync (even with publish.fsync off). If that fsync fails,
    the event is already written but append raises: the output stage retries it (a second copy,
    same seq), and the log's fd is gone, so every later append fails an assert (not an OSError):
    the stage dies on each restart and the daemon ends."""
    import errno

    import monitord.output.eventlog as eventlog

    stage, inbox, publisher = output_stage(tmp_path, max_mb=100 / 2**20)  # rotate after every ~100 bytes
    real_fsync, failed = eventlog.os.fsync, []

    def fsync(fd):
        if not failed:
            failed.append(fd)
            raise OSError(errno.EIO, "Input/output error")
        return real_fsync(fd)

    monkeypatch.setattr(eventlog.os, "fsync", fsync)
    stage.start()
    try:
        for n in range(3):
            inbox.put(status_publication(n))
        deadline = time.monotonic() + 5
        while (len(inbox) or not stage.idle) and stage.state is not StageState.FAILED and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stage.state is not StageState.FAILED, stage.error
    finally:
        inbox.close()
        stage.join(5)
        publisher.close()
    assert failed, "the fault was never hit"
    assert logged_seqs(tmp_path) == [1, 2, 3]


def restart_after_its_death(stage, inbox, publisher, then) -> None:
    """Wait for the output stage to die, restart it as the supervisor does, hand it ``then`` and
    wait until it has published all it holds; then close it and its publisher."""
    try:
        assert stage.join(30) and stage.state is StageState.FAILED
        stage.restart()
        inbox.put(then)
        deadline = time.monotonic() + 60
        while (len(inbox) or not stage.idle) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        inbox.close()
        stage.join(5)
        publisher.close()


def test_an_output_stage_that_dies_after_logging_an_event_does_not_log_it_again_on_restart(tmp_path):
    """The event in hand is retried whole by a restarted output stage, log included: if the stage
    died after the log had it (the dashboard feed, a clip request, the metrics hook raised), the
    same event is logged again under a new seq."""

    class Feed:
        def __init__(self):
            self.calls = 0

        def on_window(self, scored):
            pass

        def on_event(self, event):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("dashboard feed bug")

    stage, inbox, publisher = output_stage(tmp_path, feed=Feed())
    stage.start()
    inbox.put(status_publication(0))
    restart_after_its_death(stage, inbox, publisher, then=status_publication(1))
    details = [json.loads(line)["detail"] for line in (tmp_path / "e.jsonl").read_bytes().splitlines()]
    assert details == ["0", "1"], details


def test_an_output_stage_that_dies_publishing_clip_statuses_publishes_the_rest_once_after_restart(tmp_path):
    """Two clips written at once: the stage died on the first one's status (its feed raised), and
    the second's status, already taken from the clip writer, was never published."""
    from monitord.config import ClipsConfig
    from monitord.output.clips import ClipWriter
    from monitord.sources.ring import RingBuffer

    class Feed:
        failed = False

        def on_window(self, scored):
            pass

        def on_event(self, event):
            if event.status == "clip" and not Feed.failed:
                Feed.failed = True
                raise RuntimeError("dashboard feed bug")

    stage, inbox, publisher = output_stage(tmp_path, feed=Feed())
    clips = ClipWriter(ClipsConfig(enabled=True, dir=str(tmp_path / "clips"), pre_s=0.1, post_s=0.1))
    clips.open()
    stage.clips = clips
    ring = RingBuffer(16000 * 4, 16000)
    ring.write(np.zeros(16000 * 2, np.float32))
    for seq in (1, 2):  # two onsets whose clips are due: the post-roll is in the ring already
        clips.request("rec", ring, 0, 8000, clips.path_for("rec", "r", "2026-01-01T00:00:00.000Z"), seq)
    stage.start()
    restart_after_its_death(stage, inbox, publisher, then=status_publication(3))
    logged = [json.loads(line) for line in (tmp_path / "e.jsonl").read_bytes().splitlines()]
    assert sorted(e["onset_seq"] for e in logged if e.get("status") == "clip") == [1, 2], logged
    assert [e["seq"] for e in logged] == list(range(1, len(logged) + 1)) and len(logged) == 3


@pytest.mark.parametrize("stage_name", ["alerts", "output"])
def test_a_stop_while_a_stage_waits_for_its_restart_still_ends_alerts_and_writes_every_event(tmp_path, stage_name):
    """SIGTERM during a stage's restart backoff (1-4 s): stop() joins the dead thread (at once),
    closes the channels, and what that stage would have handled is never written: the open
    alert's offset, and the stage_failed status itself."""
    from monitord.config import load_config
    from monitord.daemon import Daemon
    from tests.conftest import free_port, silence, tone, write_wav
    from tests.test_e2e import read_log
    from tests.test_faults import ScriptedModel

    write_wav(tmp_path / "in.wav", np.concatenate([silence(1.0, RATE), tone(500, 30.0, RATE, -12)]), RATE)
    (tmp_path / "c.yaml").write_text(f"""
sources: [{{id: rec, file: in.wav, realtime: true}}]
gate: {{mode: energy, threshold_dbfs: -60}}
window: {{seconds: 1.0, hop_s: 0.5}}
models: {{clap: {{kind: clap, model: unused, labels: [tone, noise]}}}}
rules: [{{id: tone, model: clap, label: tone, threshold: 0.5}}]
publish: {{endpoint: "tcp://127.0.0.1:{free_port()}", event_log: events.jsonl}}
""")
    daemon = Daemon(load_config(tmp_path / "c.yaml"), {"clap": ScriptedModel()})
    log_path = tmp_path / "events.jsonl"
    daemon.start()
    try:
        assert wait_until(lambda: log_path.exists() and any(e.get("phase") == "onset" for e in read_log(log_path)), 20)
        stage = next(s for s in daemon.stages if s.name == stage_name)
        stage.inject_failure(RuntimeError("injected"))
        assert wait_until(lambda: stage.state is StageState.FAILED, 5)
    finally:
        daemon.stop()  # what `monitord run` does on SIGTERM, the supervisor not having restarted it yet
    logged = read_log(log_path)
    phases = [e["phase"] for e in logged if e["kind"] == "alert"]
    assert phases == ["onset", "offset"], phases
    assert any(e.get("status") == "stage_failed" and e.get("stage") == stage_name for e in logged)


def silent_flac(path, minutes: float, rate: int = 48000) -> None:
    import soundfile as sf

    block = np.zeros(rate * 10, dtype=np.int16)
    with sf.SoundFile(str(path), "w", rate, 1, subtype="PCM_16", format="FLAC") as f:
        for _ in range(int(minutes * 6)):
            f.write(block)


class TryItModel:
    name, kind, sample_rate, prompt = "clap", "clap", 48000, "This is a sound of {}."

    def prepare_labels(self, labels, prompt):
        return labels, prompt, np.zeros((len(labels), 4), dtype=np.float32)

    def probabilities_with(self, windows, text):
        return np.full((len(windows), len(text)), 1.0 / len(text), dtype=np.float32)


def test_a_small_try_it_upload_is_not_decoded_whole(tmp_path):
    """try-it scores at most TRY_MAX_WINDOWS windows but decodes the whole upload first, on the
    event loop: FLAC silence packs ~10 minutes into 110 KB, so a 20 MB upload (the default
    max_upload_mb) decodes to ~30 hours, ~10 GB of float32 per channel: one request OOMs the daemon."""
    import asyncio
    import tracemalloc
    from concurrent.futures import Future
    from types import SimpleNamespace

    from monitord.config import WindowConfig
    from monitord.output.dashboard import Dashboard

    silent_flac(tmp_path / "bomb.flac", minutes=5)
    data = (tmp_path / "bomb.flac").read_bytes()
    assert len(data) < 200_000

    def score_upload(fn):
        future: Future = Future()
        future.set_result(fn())
        return future

    models, config = {"clap": TryItModel()}, SimpleNamespace(models={"clap": SimpleNamespace(kind="clap")}, window=WindowConfig())
    daemon = SimpleNamespace(models=models, score_upload=score_upload, config=config,
                             availability=SimpleNamespace(config=config, models=models))
    dashboard = Dashboard(daemon, "127.0.0.1:8080", None)
    tracemalloc.start()
    try:
        result = asyncio.run(dashboard.classify_upload(data, ["a", "b"]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result["windows"] == 30
    assert peak < 40 * 2**20, f"{len(data) / 1e3:.0f} KB of upload took {peak / 2**20:.0f} MiB to score 30 windows"


def test_a_try_it_job_is_not_starved_by_a_steady_trickle_of_windows():
    """Low-priority jobs (the dashboard's try-it) run only when the window queue stayed empty for a
    whole 0.2 s get timeout: windows arriving every 0.1 s (4+ sources at hop 0.5 s), each scored in
    a millisecond, keep inference idle 99% of the time, yet the job never runs and the upload
    request hangs (its Future has no timeout)."""
    from types import MappingProxyType

    from monitord.windowing.queue import WindowQueue
    from monitord.inference.worker import LOW, InferenceStage
    from monitord.inference.scoring import Scorer
    from tests.test_faults import ScriptedModel

    queue = WindowQueue(64)
    stage = InferenceStage(queue, Scorer([ScriptedModel()]), Channel(10000, "alerts"))
    stop = threading.Event()

    def feed():
        t = 0.0
        while not stop.is_set():
            w = window(t)
            queue.put(Window(w.source, w.start_index, w.sample_rate, w.samples, w.valid, w.wall_start, w.ready_at,
                             w.facts, gates=MappingProxyType({"clap": Verdict.PASSED})), live=True)
            t += 0.5
            time.sleep(0.1)

    feeder = threading.Thread(target=feed, daemon=True)
    stage.start()
    feeder.start()
    try:
        time.sleep(0.3)
        job = stage.submit(lambda: "scored", priority=LOW)
        assert job.result(timeout=3) == "scored"
    finally:
        stop.set()
        feeder.join(2)
        stage.finish(0)
        stage.join(5)
    assert stage.stats.batches > 0


def test_a_reload_refused_for_timing_out_is_not_applied_later_behind_the_operators_back(tmp_path):
    """apply_reload waits stall_s for the label swap; on timeout it publishes reload_failed and keeps
    the old config, but the swap job stays queued and runs after the current batch anyway: the
    models score the new labels (and the alerts stage gets the new rules) while the daemon's config
    and its status events say the old ones are running."""
    from monitord.config import load_config
    from tests.test_faults import ScriptedModel
    from tests.test_supervisor import make_daemon

    class Relabelled(ScriptedModel):
        """Each batch is held until the test lets it go: the swap cannot begin while one is, whatever the load."""

        def __init__(self):
            super().__init__()
            self.scoring, self.go_on = threading.Event(), threading.Event()

        def score(self, windows, upstream=None):
            self.scoring.set()
            self.go_on.wait(60 * time_scale())
            return super().score(windows, upstream)

        def prepare_labels(self, labels, prompt):
            return tuple(labels)

        def use_labels(self, prepared):
            self.labels = prepared

    model = Relabelled()
    daemon = make_daemon(tmp_path, model, count=20, realtime=False)
    daemon.start()
    try:
        assert wait_until(model.scoring.is_set, 20 * time_scale())  # a batch in hand, held
        daemon.inference.stall_s = 0.3
        (tmp_path / "c2.yaml").write_text((tmp_path / "c.yaml").read_text().replace("labels: [tone, noise]",
                                                                                   "labels: [tone, noise, hum]"))
        assert daemon.apply_reload(load_config(tmp_path / "c2.yaml")) is False
        batches = daemon.inference.stats.batches
        model.go_on.set()  # the batch in hand ends; the stage takes its jobs before the next batch
        assert wait_until(lambda: daemon.inference.stats.batches > batches, 30 * time_scale())
        assert model.labels == ("tone", "noise"), "a refused reload was applied after all"
    finally:
        model.go_on.set()
        daemon.stop(drain_timeout_s=0)


def test_the_supervising_loop_never_blocks_on_a_full_output_channel(tmp_path, monkeypatch):
    """supervise() publishes stage_restarted with a blocking put that only gives up on stop():
    with the output channel full (the output stage itself failed, waiting out a longer backoff),
    restarting another stage wedges the supervising loop: the output stage is never restarted,
    SIGTERM (wait's stop event) goes unanswered and the watchdog unpinged, for good."""
    import monitord.daemon as supervisor
    from tests.test_supervisor import make_daemon

    monkeypatch.setattr(supervisor, "OUTPUT_QUEUE", 3)
    daemon = make_daemon(tmp_path)
    for n in range(3):
        daemon.output_inbox.put(status_publication(n))  # nobody drains it: the output stage is down
    daemon.alerts.state = StageState.FAILED  # died a while ago; its backoff is over
    daemon._failures["alerts"], daemon._restart_at["alerts"] = [time.monotonic()], 0.0
    stop, returned = threading.Event(), threading.Event()
    thread = threading.Thread(target=lambda: (daemon.wait(stop), returned.set()), daemon=True)
    thread.start()
    try:
        time.sleep(0.5)
        stop.set()  # SIGTERM
        assert returned.wait(3), "the supervising loop ignored SIGTERM: it is stuck publishing a status"
    finally:
        daemon._closing.set()  # unblock it either way
        thread.join(3)
        daemon.alerts.stop()
        daemon.alerts.join(3)


def test_a_token_with_characters_outside_ascii_is_a_401_not_a_500(tiny_clap, tmp_path):
    from starlette.testclient import TestClient

    from monitord.config import parse_config
    from monitord.output.dashboard import Dashboard

    class Daemonless:
        config = parse_config(f"sources: [{{id: a, device: default}}]\nmodels: {{c: {{kind: clap, model: {tiny_clap}, labels: [a, b]}}}}\n",
                              tmp_path)
        models, clips = {}, None

    client = TestClient(Dashboard(Daemonless(), "127.0.0.1:1", "a-long-enough-secret").app())
    assert client.get("/api/state", headers={"Authorization": "Bearer s\u00e9cret-s\u00e9cret-s\u00e9cret".encode("latin-1")}).status_code == 401
    assert client.get("/api/state?token=%C3%A9t%C3%A9").status_code == 401


def test_a_replay_request_larger_than_any_real_one_is_cut_off(tmp_path):
    import zmq

    from monitord.config import PublishConfig
    from monitord.output.publish import Publisher
    from tests.conftest import free_port

    replay = f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.Context()
    p = Publisher(PublishConfig(endpoint=f"tcp://127.0.0.1:{free_port()}", replay_endpoint=replay, event_log=str(tmp_path / "e.jsonl")), ctx)
    p.start()
    try:
        hog = ctx.socket(zmq.DEALER)
        hog.setsockopt(zmq.LINGER, 0)
        hog.connect(replay)
        hog.send_multipart([b"", b"{" * (1 << 20)])  # 1 MiB of request
        assert not hog.poll(1000), "a 1 MiB request was read and answered"
        hog.close()
        good = ctx.socket(zmq.REQ)
        good.setsockopt(zmq.LINGER, 0)
        good.connect(replay)
        good.send(b'{"since": 0}')
        assert good.poll(5000) and b"count" in good.recv_multipart()[0]  # the server still answers others
        good.close()
    finally:
        p.close()


class BrokenScores(dict):
    """Probabilities whose lookup works (the engine steps on it) but which break when an event is
    made of them: a bug in the middle of handling a window, after its onset was decided."""

    def __iter__(self):
        raise RuntimeError("broken score map")


def test_an_alerts_stage_that_dies_mid_window_leaves_no_alert_on_that_nobody_saw_begin():
    """Before: the engine had turned the rule on, the onset event was never made, the restarted stage
    skipped the window and a later quiet window published an offset with no onset. Now the window is
    skipped as a whole: the rule's state is as before it, and the next loud window is the onset."""
    inbox, out = Channel(1000, "alerts"), Channel(1000, "output")
    stage = AlertsStage(AlertEngine((rule(),)), inbox, out, "host", {"clap": "clap-id"})
    w = window(1.0)
    inbox.put(ScoredWindow(w, (Outcome("clap", Verdict.SCORED, Scores(w, "clap", "clap", BrokenScores(glass=0.9, other=0.1))),)))
    stage.start()
    assert stage.join(5) and stage.state is StageState.FAILED and "broken score map" in repr(stage.error)
    assert out.drain() == []
    for item in (scored(1.5, 0.1), scored(2.0, 0.9), scored(2.5, 0.1)):
        inbox.put(item)
    inbox.close()
    stage.restart()
    assert stage.join(5)
    events = [p.event for p in out.drain() if isinstance(p, Publication)]
    assert [(e.phase, e.stream_end) for e in events if e.kind == "alert"] == [("onset", 2.0 + 1.0), ("offset", 2.5 + 1.0)]


def test_an_alerts_stage_that_dies_while_handing_on_hands_on_the_rest_once():
    inbox, out = Channel(1000, "alerts"), Channel(1, "output")  # room for one: the stage waits, beating, for the second
    stage = AlertsStage(AlertEngine((rule(), rule(id="r2", release=0.5))), inbox, out, "host", {"clap": "clap-id"})
    inbox.put(scored(1.0, 0.9))  # two onsets from one window
    stage.start()
    assert wait_until(lambda: len(out) == 1, 5)
    stage.inject_failure(RuntimeError("killed while waiting for room"))
    assert stage.join(5) and stage.state is StageState.FAILED
    first = out.drain()
    inbox.close()
    stage.restart()
    rest = []
    while not stage.join(0.05):
        rest += out.drain()
    rest += out.drain()
    events = [p.event for p in [*first, *rest] if isinstance(p, Publication) and p.event.kind == "alert"]
    assert sorted((e.rule, e.phase) for e in events) == [("r", "offset"), ("r", "onset"), ("r2", "offset"), ("r2", "onset")]




def test_an_alerts_stage_that_dies_applying_new_rules_applies_them_after_its_restart(monkeypatch):
    """The daemon records a reload as applied once the inference stage has swapped labels; skipping the
    RulesChange the alerts stage died on would leave the alerts on the old rules for good."""
    inbox, out = Channel(1000, "alerts"), Channel(1000, "output")
    stage = AlertsStage(AlertEngine((rule(),)), inbox, out, "host", {"clap": "clap-id"})
    real = AlertEngine.with_rules
    calls = []

    def with_rules_dying_once(self, rules):
        calls.append(rules)
        if len(calls) == 1:
            raise RuntimeError("died applying the rules")
        return real(self, rules)

    monkeypatch.setattr(AlertEngine, "with_rules", with_rules_dying_once)
    new = (rule(id="r2", threshold=0.8),)
    inbox.put(RulesChange(new))
    stage.start()
    assert stage.join(5) and stage.state is StageState.FAILED
    inbox.put(scored(1.0, 0.9))
    inbox.close()
    stage.restart()
    assert stage.join(5) and stage.error is None
    assert stage.engine.rules == new
    events = [p.event for p in out.drain() if isinstance(p, Publication) and p.event.kind == "alert"]
    assert [(e.rule, e.phase) for e in events] == [("r2", "onset"), ("r2", "offset")]
