"""The inference stage with remote models, against the inference service behind a stdlib HTTP server
that the tests take down and bring back (no Ray: tests/test_serve.py has the real cluster).

A capture node with a local first tier ("yam", YAMNet-like, on the capture node), a remote model
gated by it ("clap"), an ungated remote model ("wide") and a local model gated by that one and
scoring from its embedding ("late"): the local tier keeps alerting through an outage, windows wait
within their bound, every window is scored remotely exactly once and the events are those of a run
where the cluster never went down.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from monitord.config import load_config
from monitord.daemon import Daemon
from monitord.inference.models import ModelBase
from monitord.inference.remote import RemoteModel
from monitord.serve.service import InferenceService
from monitord.types import Scores, StageState
from tests.conftest import free_port, silence, tone, wait_until, write_wav, time_scale
from tests.serve_helpers import Recorder
from tests.test_e2e import read_log
from tests.test_serve_wire import serving
from tests.test_supervisor import Supervised

RATE = 48000
REMOTE = ("clap", "wide")


def level_db(samples: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(samples.astype(np.float64))))) if len(samples) else 0.0
    return 20 * np.log10(rms) if rms > 0 else -240.0


def tone_probability(db: float) -> float:
    return float(np.clip((db + 40.0) / 25.0, 0.0, 1.0))


class LocalTier(ModelBase):
    """A local model: "tone" from the window's level (YAMNet-like first tier), or, with
    ``depends_on``, from the level the remote model put in its embedding."""

    model_id = "local"
    sample_rate = 16000
    labels = ("tone", "noise")

    def __init__(self, name: str, config, delay_s: float = 0.0, depends_on: str | None = None):
        super().__init__(name, config)
        self.delay_s, self.depends_on = delay_s, depends_on
        self.calls = 0

    def score(self, windows, upstream=None):
        self.calls += 1
        time.sleep(self.delay_s * len(windows))
        if self.depends_on is not None:
            assert upstream is not None and all(u.embedding is not None for u in upstream), "no embedding from upstream"
            levels = [float(u.embedding[0]) - 3.0 for u in upstream]
        else:
            levels = [w.facts.rms_dbfs for w in windows]
        return [Scores(w, self.name, self.model_id, {"tone": tone_probability(db), "noise": 1 - tone_probability(db)})
                for w, db in zip(windows, levels)]


class Served:
    """The server's model: "tone" from the level of the samples it was sent; the level is its embedding."""

    def __init__(self, name: str, delay_s: float = 0.0, fail=None):
        self.name, self.model_id, self.labels, self.sample_rate = name, "unused", ("tone", "noise"), RATE
        self.batch_max, self.batch_wait_ms, self.gated_by = 8, 10.0, None
        self.delay_s, self.fail = delay_s, fail
        self.seen: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def score(self, windows):
        time.sleep(self.delay_s)
        if self.fail is not None and (exc := self.fail(windows)) is not None:
            raise exc
        with self.lock:
            self.seen.extend((w.source, w.start_index) for w in windows)
        out = []
        for w in windows:
            db = level_db(w.samples[: w.valid])
            p = tone_probability(db)
            out.append(Scores(w, self.name, self.model_id, {"tone": p, "noise": 1 - p}, np.array([db, 1.0], dtype=np.float32)))
        return out


def beeps(count: int, rate: int = RATE) -> np.ndarray:
    """A 1 s beep every 2 s (1 s windows, 0.5 s hop: tone, half, silence, half)."""
    return np.concatenate([np.concatenate([tone(700, 1.0, rate, -12), silence(1.0, rate)]) for _ in range(count)])


def node_config(tmp_path: Path, name: str, port: int, sources: str, inference: str = "", pipeline: str = "",
                clap_labels: str = "tone, noise") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    path = folder / "monitord.yaml"
    path.write_text(f"""
sources: {sources}
gate: {{mode: energy, threshold_dbfs: -60}}
window: {{seconds: 1.0, hop_s: 0.5}}
models:
  yam: {{kind: clap, model: unused, labels: [tone, noise], batch_max: 4, batch_wait_ms: 5}}
  clap: {{kind: clap, model: unused, labels: [{clap_labels}], batch_max: 4, batch_wait_ms: 5, gated_by: {{model: yam, labels: [tone], threshold: 0.5}}}}
  wide: {{kind: clap, model: unused, labels: [tone, noise], batch_max: 4, batch_wait_ms: 5}}
  late: {{kind: clap, model: unused, labels: [tone, noise], batch_max: 4, batch_wait_ms: 5, gated_by: {{model: wide, labels: [tone], threshold: 0.5}}}}
rules:
  - {{id: yam-tone, model: yam, label: tone, threshold: 0.5}}
  - {{id: clap-tone, model: clap, label: tone, threshold: 0.6, release: 0.4, min_windows: 2, of_windows: 3}}
  - {{id: late-tone, model: late, label: tone, threshold: 0.5}}
publish: {{endpoint: "tcp://127.0.0.1:{free_port()}", event_log: events.jsonl}}
inference: {{url: 'http://127.0.0.1:{port}/monitord', models: [clap, wide], timeout_s: 1.0{inference}}}
pipeline: {{overload_status_interval_s: 1.0{pipeline}}}
""")
    return path


def service(config_path: Path, delay_s: float = 0.0, fail=None, served: dict | None = None) -> InferenceService:
    """A fresh service (a restarted cluster keeps no replay cache) over ``served`` models (kept across restarts)."""
    config = load_config(config_path)
    models = served if served is not None else {name: Served(name, delay_s, fail) for name in REMOTE}
    return InferenceService(models, {name: config.models[name] for name in models}, None, 1 << 26, 30.0, "r1")


def node(config_path: Path, local_delay_s: float = 0.0) -> tuple[Daemon, dict]:
    config = load_config(config_path)
    models = {
        "yam": LocalTier("yam", config.models["yam"], local_delay_s),
        "late": LocalTier("late", config.models["late"], depends_on="wide"),
        **{name: Recorder(RemoteModel(name, config.models[name], config.inference, verify=False)) for name in REMOTE},
    }
    return Daemon(config, models), models


def remote_scores(models: dict) -> tuple[dict, list]:
    """(model, source, start_index) -> Scores the node got back, and the keys it got twice."""
    seen, twice = {}, []
    for name in REMOTE:
        for s in models[name].scored:
            key = (name, s.window.source, s.window.start_index)
            if key in seen:
                twice.append(key)
            seen[key] = s
    return seen, twice


def alerts(events: list[dict]) -> dict[str, list[dict]]:
    keys = ("rule", "phase", "source", "label", "score", "scores", "model", "model_name", "stream_start", "stream_end", "reason")
    out: dict[str, list[dict]] = {}
    for e in events:
        if e["kind"] == "alert":
            out.setdefault(e["rule"], []).append({k: e.get(k) for k in keys})
    return out


def statuses(events: list[dict], name: str, source: str | None = None) -> list[dict]:
    return [e for e in events if e["kind"] == "status" and e["status"] == name and (source is None or e["source"] == source)]


def log_of(config_path: Path) -> list[dict]:
    path = config_path.parent / "events.jsonl"
    return read_log(path) if path.exists() else []


def run_through(daemon: Daemon, timeout: float = 90.0) -> None:
    run = Supervised(daemon, until_done=True)
    try:
        run.thread.join(timeout)
        assert not run.thread.is_alive(), "the run did not finish"
    finally:
        run.close()


def reference_run(tmp_path: Path, sources: str, **config) -> tuple[list[dict], dict]:
    """The same node with the cluster up all along: its events and remote scores."""
    port = free_port()
    path = node_config(tmp_path, "reference", port, sources, **config)
    daemon, models = node(path)
    with serving(service(path), port=port):
        run_through(daemon)
    scores, twice = remote_scores(models)
    assert not twice and scores
    return log_of(path), scores


def test_a_cluster_down_mid_run_the_local_tier_alerts_on_and_nothing_is_lost_or_scored_twice(tmp_path):
    write_wav(tmp_path / "in.wav", beeps(20), RATE)
    sources = f"[{{id: rec, file: {tmp_path / 'in.wav'}}}]"
    expected_events, expected_scores = reference_run(tmp_path, sources)
    port = free_port()
    path = node_config(tmp_path, "outage", port, sources)
    daemon, models = node(path, local_delay_s=0.04)  # the local tier takes ~3 s for the file: the outage falls within it
    served = {name: Served(name) for name in REMOTE}
    run = None
    try:
        with serving(service(path, served=served), port=port):
            run = Supervised(daemon, until_done=True)
            assert wait_until(lambda: sum(len(models[n].scored) for n in REMOTE) >= 2, 20), "no remote answer before the outage"
        # the cluster is gone (listener and open connections): local alerts go on
        assert wait_until(lambda: statuses(log_of(path), "inference_down"), 20), "no inference_down status"
        down = statuses(log_of(path), "inference_down")[0]
        assert wait_until(lambda: [e for e in log_of(path) if e.get("rule") == "yam-tone" and e["seq"] > down["seq"]], 20), \
            "no local alert after the cluster went down"
        assert wait_until(lambda: daemon.inference.state is StageState.DEGRADED, 5) and daemon.healthy()
        assert daemon.inference.remote_waiting > 0 and run.thread.is_alive()
        time.sleep(1.5)  # a resend or two fails meanwhile
        with serving(service(path, served=served), port=port):  # back, with no memory of earlier requests
            run.thread.join(90)
            assert not run.thread.is_alive(), "the run did not finish after the cluster came back"
    finally:
        if run is not None:
            run.close()
    events = log_of(path)
    down, up = statuses(events, "inference_down"), statuses(events, "inference_up")
    assert len(down) == 1 and len(up) == 1 and down[0]["seq"] < up[0]["seq"], (down, up)
    assert down[0]["source"] == up[0]["source"] == "daemon" and down[0]["url"] == up[0]["url"] == f"http://127.0.0.1:{port}/monitord"
    assert up[0]["down_s"] >= 1.5
    local = [e for e in events if e.get("rule") == "yam-tone"]
    assert all(e["seq"] < up[0]["seq"] for e in local), "the local tier waited for the cluster"
    # every window scored remotely exactly once, and the events of a run where the cluster never went down
    scores, twice = remote_scores(models)
    assert not twice, f"scored twice: {twice}"
    assert set(scores) == set(expected_scores)
    assert all(scores[k].probabilities == expected_scores[k].probabilities for k in scores)
    assert alerts(events) == alerts(expected_events)
    assert {"yam-tone", "clap-tone", "late-tone"} <= set(alerts(events))
    stats = daemon.inference.stats
    assert sum(stats.remote_resends.values()) >= 1 and stats.failures == 0 and stats.dropped_after_failure == 0
    assert not statuses(events, "model_error") and daemon.inference.idle and daemon.inference.remote_waiting == 0
    # and it shows in the metrics
    from prometheus_client import generate_latest

    from monitord.output.metrics import Metrics

    metrics = Metrics(daemon.snapshot)
    text = generate_latest(metrics.registry).decode()
    windows_wide = sum(1 for k in scores if k[0] == "wide")
    assert f'monitord_remote_forward_batch_windows_count{{model="wide"}} {float(windows_wide)}' in text
    assert 'monitord_remote_forward_batch_windows_bucket{le="1.0",model="wide"}' in text
    assert f'monitord_remote_resends_total{{model="clap"}} {float(stats.remote_resends["clap"])}' in text
    assert "monitord_inference_up 1.0" in text and "monitord_remote_waiting_windows 0.0" in text


def test_a_live_source_with_the_cluster_down_drops_its_own_oldest_waiting_windows_and_a_file_waits(tmp_path):
    write_wav(tmp_path / "live.wav", beeps(4), RATE)
    write_wav(tmp_path / "rec.wav", beeps(5), RATE)
    port = free_port()  # nothing listens here until the live source has ended
    path = node_config(tmp_path, "node", port,
                       f"[{{id: live, file: {tmp_path / 'live.wav'}, realtime: true}}, {{id: rec, file: {tmp_path / 'rec.wav'}}}]",
                       inference=", max_waiting_windows: 4", pipeline=", queue_max_windows: 4")
    daemon, models = node(path)
    most, held = [0], [False]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            most[0] = max(most[0], daemon.inference.remote_waiting)
            held[0] = held[0] or daemon.queue.holding
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    run = Supervised(daemon, until_done=True)
    try:
        sampler.start()
        live = next(s for s in daemon.windowing if s.cutter.source == "live")
        assert wait_until(lambda: live.finished, 30), "the live source did not end"
        assert daemon.inference.remote_waiting <= 4 + 4 + 4
        with serving(service(path), port=port):
            run.thread.join(60)
            assert not run.thread.is_alive(), "the run did not finish after the cluster came back"
    finally:
        sampling.set()
        sampler.join(5)
        run.close()
    events = log_of(path)
    stats, outcomes = daemon.inference.stats, daemon.alerts.outcomes
    cut = {s.cutter.source: s.stats.cut for s in daemon.windowing}
    # bounded: the bound, what the file had queued when it was held, one batch
    assert most[0] <= 4 + 4 + 4, most[0]
    assert held[0], "the file was never held"
    # the live source: its own windows taken off remote scoring, counted, reported; its local tier went on
    assert stats.remote_dropped["live"] > 0 and "rec" not in stats.remote_dropped
    assert outcomes[("live", "wide", "unavailable")] > 0
    assert sum(outcomes[("live", m, "unavailable")] for m in REMOTE) >= stats.remote_dropped["live"]
    assert not daemon.queue.dropped, f"windows dropped at the window queue: {dict(daemon.queue.dropped)}"
    assert outcomes[("live", "yam", "scored")] + outcomes[("live", "yam", "quiet")] == cut["live"]
    overloads = statuses(events, "overload")
    assert overloads and all(e["source"] == "live" and e["remote"] is True for e in overloads)
    assert overloads[-1]["dropped"] <= stats.remote_dropped["live"] and len(overloads) <= 8 / 1.0 + 1
    up = statuses(events, "inference_up")[0]
    assert [e for e in events if e.get("rule") == "yam-tone" and e["source"] == "live" and e["seq"] < up["seq"]]
    parse = lambda t: datetime.strptime(t, "%Y-%m-%dT%H:%M:%S.%fZ")
    began, ended = statuses(events, "up", "live")[0], statuses(events, "eof", "live")[0]
    assert (parse(ended["time"]) - parse(began["time"])).total_seconds() < 8.0 + 0.5  # the live source never waited
    # the file: no window dropped, every one scored remotely exactly once
    scores, twice = remote_scores(models)
    assert not twice
    for model in REMOTE:
        assert outcomes[("rec", model, "unavailable")] == 0 and outcomes[("rec", model, "failed")] == 0
        assert outcomes[("rec", model, "scored")] == sum(1 for k in scores if k[:2] == (model, "rec"))
    assert outcomes[("rec", "wide", "scored")] + outcomes[("rec", "wide", "quiet")] == cut["rec"]
    clap = [e for e in events if e.get("rule") == "clap-tone" and e["source"] == "rec"]
    assert [e["phase"] for e in clap] == ["onset", "offset"] and clap[1]["reason"] == "end of stream"  # the end came after them


def test_the_stage_dying_with_requests_in_the_air_is_restarted_and_loses_and_repeats_nothing(tmp_path):
    write_wav(tmp_path / "in.wav", beeps(16), RATE)
    sources = f"[{{id: rec, file: {tmp_path / 'in.wav'}}}]"
    expected_events, expected_scores = reference_run(tmp_path, sources)
    port = free_port()
    path = node_config(tmp_path, "node", port, sources, inference=", max_in_flight: 2")
    daemon, models = node(path)
    served = {name: Served(name, delay_s=0.25) for name in REMOTE}
    inference = daemon.inference
    with serving(service(path, served=served), port=port):
        run = Supervised(daemon, until_done=True)
        try:
            # 1: killed at a beat while requests are in the air and others wait to be sent
            assert wait_until(lambda: inference.remote_in_flight >= 1 and len(inference._to_send) >= 1, 20)
            inference.inject_failure(RuntimeError("injected while requests are in the air"))
            assert wait_until(lambda: inference.state is StageState.FAILED, 5)
            assert not daemon.healthy() and not daemon.health()["inference"].ok
            assert wait_until(lambda: inference.restarts == 1 and inference.alive, 10)
            # 2: the loop that collects remote answers raises in the middle of handling one (its scores not yet taken in)
            real, raised = inference.scorer.apply, []

            def apply(model, state, indices, results):
                if model.name in REMOTE and not raised:
                    raised.append(model.name)
                    raise RuntimeError("injected into the handling of a remote answer")
                real(model, state, indices, results)

            inference.scorer.apply = apply
            assert wait_until(lambda: raised and inference.state is StageState.FAILED, 20), "no remote answer came to fail on"
            assert wait_until(lambda: inference.restarts == 2 and inference.alive, 10)
            run.thread.join(90)
            assert not run.thread.is_alive(), "the run did not finish"
        finally:
            run.close()
    events = log_of(path)
    failed = statuses(events, "stage_failed")
    assert [e["stage"] for e in failed] == ["inference", "inference"], failed
    assert "in the air" in failed[0]["detail"] and "handling of a remote answer" in failed[1]["detail"]
    scores, twice = remote_scores(models)
    assert not twice, f"scored twice: {twice}"
    assert set(scores) == set(expected_scores)
    for model in served.values():  # nor asked twice: nothing was resent
        assert len(model.seen) == len(set(model.seen))
    assert alerts(events) == alerts(expected_events)


def test_a_refusal_fails_those_windows_without_retrying_and_the_rest_goes_on(tmp_path):
    write_wav(tmp_path / "in.wav", beeps(4), RATE)
    sources = f"[{{id: rec, file: {tmp_path / 'in.wav'}}}]"
    port = free_port()
    path = node_config(tmp_path, "node", port, sources, clap_labels="tone, noise, hum")
    theirs = node_config(tmp_path, "server", port, sources)  # the server's clap has other labels: 409 for clap
    daemon, models = node(path)
    served = {name: Served(name) for name in REMOTE}
    with serving(service(theirs, served=served), port=port):
        run_through(daemon)
    events, outcomes, stats = log_of(path), daemon.alerts.outcomes, daemon.inference.stats
    errors = statuses(events, "model_error")
    assert errors and all("HTTP 409" in e["detail"] and "model clap" in e["detail"] for e in errors)
    assert outcomes[("rec", "clap", "failed")] == stats.remote_refused > 0 and outcomes[("rec", "clap", "scored")] == 0
    assert served["clap"].seen == [] and stats.remote_resends["clap"] == 0 and models["clap"].transport.retries == 0
    assert outcomes[("rec", "wide", "scored")] > 0 and outcomes[("rec", "wide", "failed")] == 0
    assert [e["phase"] for e in events if e.get("rule") == "yam-tone"] == ["onset", "offset"] * 4
    assert not statuses(events, "inference_down")


def test_a_model_failing_on_the_server_is_split_and_retried_like_a_local_one(tmp_path):
    write_wav(tmp_path / "in.wav", beeps(4), RATE)
    sources = f"[{{id: rec, file: {tmp_path / 'in.wav'}}}]"
    port = free_port()
    path = node_config(tmp_path, "node", port, sources)
    daemon, models = node(path)
    poison = 2 * RATE  # the window at 2.0 s always fails; any batch of more than one window does too

    def fail(windows):
        if len(windows) > 1 or windows[0].start_index == poison:
            return RuntimeError("CUDA out of memory (simulated)")
        return None

    served = {"clap": Served("clap"), "wide": Served("wide", fail=fail)}
    with serving(service(path, served=served), port=port):
        run_through(daemon)
    events, outcomes, stats = log_of(path), daemon.alerts.outcomes, daemon.inference.stats
    errors = statuses(events, "model_error")
    assert len(errors) == 1 and "model wide failed on the window at 2.00 s" in errors[0]["detail"]
    assert outcomes[("rec", "wide", "failed")] == stats.dropped_after_failure == 1
    scores, twice = remote_scores(models)
    assert not twice and outcomes[("rec", "wide", "scored")] == sum(1 for k in scores if k[0] == "wide") > 4
    assert all(n == 1 for n in models["wide"].stats.batch_sizes)  # only single windows got through
    assert stats.failures > 1 and not statuses(events, "inference_down")


def test_a_reload_that_changes_a_remote_models_labels_is_refused(tmp_path):
    port = free_port()  # the cluster need not be up for this
    write_wav(tmp_path / "in.wav", beeps(30), RATE)
    path = node_config(tmp_path, "node", port, f"[{{id: rec, file: {tmp_path / 'in.wav'}, realtime: true}}]")
    daemon, models = node(path)
    run = Supervised(daemon)
    try:
        assert wait_until(lambda: daemon.inference.state in (StageState.RUNNING, StageState.DEGRADED), 10)
        changed = path.parent / "changed.yaml"
        changed.write_text(path.read_text().replace("labels: [tone, noise], batch_max: 4, batch_wait_ms: 5, gated_by: {model: yam",
                                                    "labels: [tone, noise, hum], batch_max: 4, batch_wait_ms: 5, gated_by: {model: yam"))
        assert daemon.apply_reload(load_config(changed)) is False
        assert daemon.config.models["clap"].labels == ("tone", "noise") and models["clap"].labels == ("tone", "noise")
        assert daemon.inference.alive
        changed.write_text(path.read_text().replace("timeout_s: 1.0", "timeout_s: 2.0"))
        assert daemon.apply_reload(load_config(changed)) is False
        assert daemon.config.inference.timeout_s == 1.0
    finally:
        run.close()
    refused = statuses(log_of(path), "reload_failed")
    assert len(refused) == 2 and refused[0]["detail"].startswith("models.clap: new labels could not be prepared: model clap is scored at")
    assert "change its labels in the server's config too" in refused[0]["detail"]
    assert refused[1]["detail"].startswith("inference changed: restart monitord")


def loud_window(source: str, i: int):
    """A second of tone at ``i`` seconds that every model's gate passed."""
    from dataclasses import replace

    from monitord.inference import wire
    from monitord.types import Verdict, WindowFacts

    window = wire.make_window(wire.WindowMeta(source, i * RATE, RATE, RATE, 0.0, 0.0), tone(700, 1.0, RATE, -12), RATE)
    return replace(window, gates={"yam": Verdict.PASSED, "clap": Verdict.PASSED},
                   facts=WindowFacts(-12.0, -12.0, -12.0, 0.0, 0, 0.0))


def test_remote_answers_do_not_wait_for_the_local_tier_nor_it_for_them():
    """The stage alone: a remote model that answers only when told; the local tier's outcomes go on
    at once, the remote ones in queue order, and the source's end only after them."""
    from monitord.config import CascadeConfig
    from monitord.windowing.queue import WindowQueue
    from monitord.inference.worker import InferenceStage
    from monitord.inference.scoring import Scorer
    from monitord.stage import Channel
    from monitord.types import ScoredWindow, StreamEnd, Verdict

    release = threading.Event()

    class Remote(ModelBase):
        device, model_id, sample_rate, labels = "remote", "r", RATE, ("tone", "noise")

        def __init__(self):
            super().__init__("clap", SimpleNamespace(batch_max=2, batch_wait_ms=1, gated_by=CascadeConfig(model="yam", labels=("tone",), threshold=0.5)))

        def score(self, windows, upstream=None):
            release.wait(10)
            return [Scores(w, "clap", "r", {"tone": 1.0, "noise": 0.0}) for w in windows]

    yam = LocalTier("yam", SimpleNamespace(batch_max=2, batch_wait_ms=1, gated_by=None))
    queue, out = WindowQueue(64), Channel(64)
    stage = InferenceStage(queue, Scorer([Remote(), yam]), out, max_in_flight=2)
    for i in range(6):
        queue.put(loud_window("a", i), live=False)
    queue.put(StreamEnd("a", 6.0), live=False)
    stage.start()
    try:
        got = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(got) < 6:
            item = out.get(0.1)
            if item is not None:
                got.append(item)
        assert [tuple(o.model for o in s.outcomes) for s in got] == [("yam",)] * 6  # the local tier, not waiting
        assert not stage.idle and stage.remote_waiting == 6 and out.get(0.3) is None
        assert stage.remote_in_flight == 2 and len(stage._to_send) == 1  # max_in_flight requests of 2 windows in the air
        release.set()
        rest = []
        while len(rest) < 7:
            item = out.get(5)
            assert item is not None, rest
            rest.append(item)
        assert [s.window.start_index for s in rest[:6]] == [i * RATE for i in range(6)]
        assert all(isinstance(s, ScoredWindow) and s.verdict("clap") is Verdict.SCORED for s in rest[:6])
        assert isinstance(rest[6], StreamEnd)  # after every remote outcome of its source
        assert wait_until(lambda: stage.idle, 5)
    finally:
        stage.finish(5)
        stage.join(10)


def test_over_the_bound_a_live_source_drops_its_own_oldest_waiting_window_even_one_in_the_air():
    """Even the window whose request is in the air: its answer, when it comes, is not used, and the
    windows behind it are handed on at once (memory stays bounded while the cluster hangs)."""
    from monitord.windowing.queue import WindowQueue
    from monitord.inference.worker import InferenceStage
    from monitord.inference.scoring import Scorer
    from monitord.stage import Channel
    from monitord.types import ScoredWindow, Verdict

    release = threading.Event()

    class Slow(ModelBase):  # the cluster is slow: nothing comes back until released
        device, model_id, sample_rate, labels = "remote", "r", RATE, ("tone", "noise")

        def __init__(self):
            super().__init__("clap", SimpleNamespace(batch_max=1, batch_wait_ms=1, gated_by=None))

        def score(self, windows, upstream=None):
            release.wait(10)
            return [Scores(w, "clap", "r", {"tone": 1.0, "noise": 0.0}) for w in windows]

    yam = LocalTier("yam", SimpleNamespace(batch_max=1, batch_wait_ms=1, gated_by=None))
    queue, out, dropped = WindowQueue(64), Channel(64), []
    stage = InferenceStage(queue, Scorer([Slow(), yam]), out, max_in_flight=1, max_waiting_windows=3,
                           on_remote_drop=lambda w: dropped.append(w.start_index // RATE))
    stage.start()
    try:
        for i in range(7):
            queue.put(loud_window("a", i), live=True)
            # the window is taken in (out of hand) a moment before the oldest waiting one is dropped
            assert wait_until(lambda: len(queue) == 0 and stage.idle is False and not stage._in_hand
                              and stage.remote_waiting <= 4, 10 * time_scale()), stage.remote_waiting
        assert wait_until(lambda: dropped == [0, 1, 2, 3], 10 * time_scale()), dropped
        assert stage.stats.remote_dropped == {"a": 4}  # window 0 was in the air
        release.set()
        verdicts: dict[int, list] = {}
        while len(verdicts) < 7 or any(len(v) < 2 for v in verdicts.values()):
            item = out.get(5)
            assert isinstance(item, ScoredWindow), verdicts
            verdicts.setdefault(item.window.start_index // RATE, []).extend((o.model, o.verdict) for o in item.outcomes)
        clap = {i: dict(v)["clap"] for i, v in verdicts.items()}
        assert clap == {0: Verdict.UNAVAILABLE, 1: Verdict.UNAVAILABLE, 2: Verdict.UNAVAILABLE, 3: Verdict.UNAVAILABLE,
                        4: Verdict.SCORED, 5: Verdict.SCORED, 6: Verdict.SCORED}
        assert all(dict(v)["yam"] is Verdict.SCORED for v in verdicts.values())
    finally:
        release.set()
        stage.finish(5)
        stage.join(10)


def test_stopping_drains_remote_work_within_the_drain_timeout_and_hands_on_what_was_scored():
    from monitord.windowing.queue import WindowQueue
    from monitord.inference.worker import InferenceStage
    from monitord.inference.scoring import Scorer
    from monitord.stage import Channel
    from monitord.types import ScoredWindow, StreamEnd, Verdict

    class Remote(ModelBase):
        device, model_id, sample_rate, labels = "remote", "r", RATE, ("tone", "noise")

        def __init__(self, answer: threading.Event):
            super().__init__("clap", SimpleNamespace(batch_max=2, batch_wait_ms=1, gated_by=None))
            self.answer = answer

        def score(self, windows, upstream=None):
            self.answer.wait(10)
            return [Scores(w, "clap", "r", {"tone": 1.0, "noise": 0.0}) for w in windows]

    def stop_with_work_waiting(answer: threading.Event, drain_s: float,
                               answer_after_s: float | None = None) -> tuple[InferenceStage, list, float]:
        queue, out = WindowQueue(64), Channel(64)
        stage = InferenceStage(queue, Scorer([Remote(answer), LocalTier("yam", SimpleNamespace(batch_max=2, batch_wait_ms=1, gated_by=None))]),
                               out, max_in_flight=1)
        for i in range(6):
            queue.put(loud_window("a", i), live=False)
        queue.put(StreamEnd("a", 6.0), live=False)
        stage.start()
        assert wait_until(lambda: len(queue) == 0 and stage.remote_waiting == 6, 10 * time_scale())
        if answer_after_s is not None:  # from here: a timer started before could answer before all six wait
            threading.Timer(answer_after_s, answer.set).start()
        began = time.monotonic()
        stage.finish(drain_s)
        assert stage.join(drain_s + 5), "the stage did not stop"
        took = time.monotonic() - began
        return stage, [item for item in out.drain()], took

    stage, items, took = stop_with_work_waiting(threading.Event(), 10.0, answer_after_s=0.5)  # the answers come within the drain timeout
    remote = [s for s in items if isinstance(s, ScoredWindow) and s.verdict("clap") is not None]
    assert [s.verdict("clap") for s in remote] == [Verdict.SCORED] * 6 and isinstance(items[-1], StreamEnd)
    assert stage.stats.abandoned_at_shutdown == 0 and took < 5 * time_scale()
    never = threading.Event()
    try:
        stage, items, took = stop_with_work_waiting(never, 0.5)  # they do not
        remote = [s for s in items if isinstance(s, ScoredWindow) and s.verdict("clap") is not None]
        assert [s.verdict("clap") for s in remote] == [Verdict.UNAVAILABLE] * 6 and isinstance(items[-1], StreamEnd)
        assert sum(isinstance(s, ScoredWindow) and s.verdict("yam") is Verdict.SCORED for s in items) == 6
        assert stage.stats.abandoned_at_shutdown == 6 and 0.5 <= took < 3 * time_scale()
    finally:
        never.set()


def test_the_stage_dying_while_its_second_tier_scores_is_restarted_and_loses_and_repeats_nothing():
    """A local cascade (yam gating clap) with clap on its own thread: the stage thread is killed while
    a clap call is in the air; restarted, it collects that answer, and every window leaves with both
    outcomes, once each, in order. A job (a label swap) never runs while clap scores."""
    from monitord.config import CascadeConfig
    from monitord.windowing.queue import WindowQueue
    from monitord.inference.worker import InferenceStage
    from monitord.inference.scoring import Scorer
    from monitord.stage import Channel
    from monitord.types import ScoredWindow, StageState, StreamEnd, Verdict

    release, scoring = threading.Event(), threading.Event()
    seen: list[int] = []

    class Second(LocalTier):
        def score(self, windows, upstream=None):
            scoring.set()
            release.wait(10 * time_scale())
            seen.extend(w.start_index for w in windows)
            result = super().score(windows, upstream)
            scoring.clear()
            return result

    clap = Second("clap", SimpleNamespace(batch_max=2, batch_wait_ms=1, gated_by=CascadeConfig(model="yam", labels=("tone",), threshold=0.5)))
    yam = LocalTier("yam", SimpleNamespace(batch_max=2, batch_wait_ms=1, gated_by=None))
    queue, out = WindowQueue(64), Channel(64)
    stage = InferenceStage(queue, Scorer([yam, clap]), out)
    assert [m.name for m in stage.tier_models] == ["clap"]
    for i in range(8):
        queue.put(loud_window("a", i), live=False)
    queue.put(StreamEnd("a", 8.0), live=False)
    stage.start()
    try:
        assert wait_until(lambda: stage._tier_flights.get("clap") is not None and stage._tier_flights["clap"].running == 1, 10 * time_scale())
        job_ran_while_scoring = stage.submit(lambda: scoring.is_set())
        stage.inject_failure(RuntimeError("injected while the second tier scores"))
        assert wait_until(lambda: stage.state is StageState.FAILED, 10 * time_scale())
        stage.restart()
        release.set()
        got = []
        while not (got and isinstance(got[-1], StreamEnd)):
            item = out.get(10 * time_scale())
            assert item is not None, got
            got.append(item)
        assert job_ran_while_scoring.result(10 * time_scale()) is False
    finally:
        stage.finish(5)
        stage.join(10)
    windows = [s for s in got if isinstance(s, ScoredWindow)]
    outcomes = sorted((s.window.start_index, o.model) for s in windows for o in s.outcomes)
    assert outcomes == sorted((i * RATE, m) for i in range(8) for m in ("yam", "clap"))  # each once, none lost
    assert sorted(seen) == [i * RATE for i in range(8)]  # clap asked once per window: nothing sent again
    assert all(s.verdict("clap") is Verdict.SCORED for s in windows if any(o.model == "clap" for o in s.outcomes))
    clap_order = [s.window.start_index for s in windows if any(o.model == "clap" for o in s.outcomes)]
    assert clap_order == sorted(clap_order)  # in order
    assert stage.restarts == 1
