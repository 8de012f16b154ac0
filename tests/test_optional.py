"""Optional models: the daemon starts without one that cannot be loaded, says what is missing and
how to fix it, and shows what is inactive (in check-config, the status event and the dashboard)."""

from __future__ import annotations

import subprocess
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from monitord.config import inactive_without, load_config, parse_config
from monitord.daemon import Availability, Daemon
from monitord.inference.build import load_models
from monitord.inference.models import ModelUnavailable
from monitord.inference.models.loading import hf_command
from tests.conftest import AUDIO, REPO, free_port, monitord_cmd, shared_path, silence, write_wav
from tests.test_e2e import is_alert, read_log

CONFIG = """
sources: [{{id: porch, file: cat.wav}}]
gate: {{mode: energy, threshold_dbfs: -50}}
models:
  yam: {{kind: yamnet, groups: {{cat: [Cat, Meow, Caterwaul, Purr]}}}}
  clap:
    kind: clap
    model: ./no-such-clap
    labels: [cat meowing, speech, silence]
    optional: true
    gated_by: {{model: yam, labels: [cat], threshold: 0.1}}
  {extra}
rules:
  - {{id: cat, model: yam, label: cat, threshold: 0.3, release: 0.2}}
  - {{id: cat-confirmed, model: clap, label: cat meowing, threshold: 0.5}}
publish: {{endpoint: "tcp://127.0.0.1:{port}", event_log: events.jsonl}}
"""


def write(tmp_path, extra: str = "") -> object:
    if not (tmp_path / "cat.wav").exists():
        write_wav(tmp_path / "cat.wav", silence(1.0, 16000), 16000)
    (tmp_path / "c.yaml").write_text(CONFIG.format(port=free_port(), extra=extra))
    return tmp_path / "c.yaml"


def test_what_is_inactive_without_a_model(tmp_path):
    write_wav(tmp_path / "cat.wav", silence(1.0, 16000), 16000)
    config = parse_config(CONFIG.format(port=5556, extra="odd: {kind: anomaly, embedding_model: clap, bank: bank.npz}"), tmp_path)
    models, rules = inactive_without(config, {"clap"})
    assert models == {"clap": "not loaded", "odd": "scores the embeddings of clap, which is not loaded"}
    assert rules == {"cat-confirmed": "model clap is not loaded"}
    models, rules = inactive_without(config, {"yam"})
    assert models == {"yam": "not loaded", "clap": "gated by yam, which is not loaded",
                      "odd": "scores the embeddings of clap, which is inactive"}
    assert set(rules) == {"cat", "cat-confirmed"}


def test_an_optional_model_that_cannot_load_is_left_out_with_its_reason(tmp_path):
    config = load_config(write(tmp_path))
    models = load_models(config)
    assert set(models) == {"yam"} and set(models.unavailable) == {"clap"}
    reason = models.unavailable["clap"]
    assert "no-such-clap" in reason.missing and "hf download" in reason.fix
    required = config.model_copy(update={"models": {**config.models, "clap": config.models["clap"].model_copy(update={"optional": False})}})
    with pytest.raises(ModelUnavailable, match="no-such-clap"):
        load_models(required)  # models stay required by default


def test_check_config_says_which_rules_depend_on_optional_models(tmp_path):
    out = subprocess.run(monitord_cmd("check-config", str(write(tmp_path))), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert ("models.clap: optional: where it cannot be loaded, monitord starts without it; inactive then: rules cat-confirmed"
            in out.stdout), out.stdout


def test_the_daemon_runs_without_it_says_so_once_and_alerts_through_the_rest(tmp_path):
    from monitord.output.dashboard import Dashboard

    clip = shared_path(AUDIO / "cat" / "esc50_cat_3-95694-A-5.wav")
    data, rate = sf.read(str(clip), dtype="float32", always_2d=True)
    write_wav(tmp_path / "cat.wav", np.concatenate([silence(1.0, rate), data.mean(axis=1), silence(2.0, rate)]), rate)
    config = load_config(write(tmp_path))
    daemon = Daemon(config, load_models(config))
    daemon.start()
    daemon.wait(threading.Event(), until_done=True)
    # a reload that changes the absent model's labels neither crashes nor touches it
    assert daemon.apply_reload(config.model_copy(update={"models": {**config.models, "clap": config.models["clap"].model_copy(
        update={"labels": ("cat meowing", "speech", "silence", "music")})}}))
    dashboard = Dashboard(daemon, "127.0.0.1:1", None)
    states, rules = dashboard.model_states(), {r["id"]: r for r in dashboard.rule_states()}
    daemon.stop()
    events = read_log(tmp_path / "events.jsonl")
    unavailable = [e for e in events if e["kind"] == "status" and e["status"] == "model_unavailable"]
    assert len(unavailable) == 1 and unavailable[0]["source"] == "daemon" and unavailable[0]["model"] == "clap"
    detail = unavailable[0]["detail"]
    assert "optional model clap" in detail and "no-such-clap" in detail and "hf download" in detail
    assert "Inactive until then: rules cat-confirmed" in detail and unavailable[0]["inactive_rules"] == ["cat-confirmed"]
    assert any(is_alert("cat", "onset")(e) for e in events)
    assert not any(e["kind"] == "alert" and e["rule"] == "cat-confirmed" for e in events)
    assert not [e for e in events if e["kind"] == "status" and e["status"] in ("stage_failed", "model_error")]
    assert states["yam"]["state"] == "active" and states["clap"]["state"] == "inactive"
    assert "no-such-clap" in states["clap"]["detail"] and f"Fix: {hf_command()} download" in states["clap"]["detail"]
    assert rules["cat"]["active"] and not rules["cat-confirmed"]["active"]
    assert rules["cat-confirmed"]["detail"] == "model clap is not loaded"


def test_remote_models_show_as_remote_and_are_not_offered_to_try_it(tmp_path):
    from monitord.output.dashboard import Dashboard

    config = load_config(write(tmp_path))
    remote = SimpleNamespace(device="remote", model_id="http://gpu-box:8000", labels=("cat meowing",))
    local = SimpleNamespace(device="cpu", model_id="yamnet:builtin", labels=("Cat",))
    models = {"yam": local, "clap": remote}
    fake = SimpleNamespace(config=config, models=models, clips=None, sources=[],
                           availability=Availability(config, models, {}, {}, {}, frozenset(), frozenset()))
    dashboard = Dashboard(fake, "127.0.0.1:1", None)
    states = dashboard.model_states()
    assert states["clap"]["state"] == "remote" and states["yam"]["state"] == "active"
    assert dashboard.try_models() == {"yam": "yamnet"}
    from starlette.testclient import TestClient

    state = TestClient(dashboard.app(), base_url="http://127.0.0.1:8080").get("/api/state").json()
    assert state["models"]["clap"]["state"] == "remote" and state["try_it"] == {"yam": "yamnet"}
    assert state["source_states"] == {"porch": {"state": "starting", "detail": ""}}


def test_a_rule_a_reload_adds_on_an_absent_model_shows_as_inactive(tmp_path):
    from monitord.output.dashboard import Dashboard

    config = load_config(write(tmp_path))
    daemon = Daemon(config, load_models(config))
    daemon.start()
    try:
        daemon.wait(threading.Event(), until_done=True)
        added = config.rules[1].model_copy(update={"id": "cat-confirmed-2", "threshold": 0.6})
        assert daemon.apply_reload(config.model_copy(update={"rules": (*config.rules, added)}))
        rules = {r["id"]: r for r in Dashboard(daemon, "127.0.0.1:1", None).rule_states()}
    finally:
        daemon.stop()
    assert rules["cat-confirmed-2"]["state"] == "inactive" and not rules["cat-confirmed-2"]["active"], rules["cat-confirmed-2"]
    assert rules["cat-confirmed-2"]["detail"] == "model clap is not loaded"
    assert rules["cat"]["state"] == "active"


def test_the_dashboard_never_reads_half_of_a_change_in_what_is_loading(tmp_path):
    """A writer flips an optional model between loading and not loaded the way the daemon does
    (a failed load), while a reader takes the dashboard's model and rule states: each read is one
    state or the other, never the model in one and its rule in the other."""
    import sys

    from monitord.output.dashboard import Dashboard

    config = load_config(write(tmp_path))
    models = load_models(config)
    daemon = Daemon(config, {"yam": models["yam"]}, loading={"clap"})
    dashboard = Dashboard(daemon, "127.0.0.1:1", None)
    reason = ModelUnavailable("no", missing="the directory ./no-such-clap", fix="hf download it")
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            daemon.unavailable, daemon.loading = {"clap": reason}, frozenset()  # as _not_loaded does
            daemon._update_inactive()
            daemon.unavailable, daemon.loading = {}, frozenset({"clap"})
            daemon._update_inactive()

    seen, torn = set(), []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    writer = threading.Thread(target=flip, daemon=True)
    writer.start()
    try:
        for _ in range(20000):
            availability = daemon.availability  # one snapshot, as the page's answer takes it
            model, rules = dashboard.model_states(availability)["clap"], dashboard.rule_states(availability)
            rule = {r["id"]: r for r in rules}["cat-confirmed"]
            # one state or the other: loading (no reason yet) or not loaded (the reason), the model and its rule alike
            model_state = (model["state"], model["detail"].startswith("not loaded: the directory"))
            seen.add(model_state)
            if model_state not in {("loading", False), ("inactive", True)} or rule["state"] != model["state"]:
                torn.append((model, rule))
            if len(seen) == 2 and len(torn) > 3:
                break
    finally:
        stop.set()
        writer.join()
        sys.setswitchinterval(interval)
    assert seen == {("loading", False), ("inactive", True)}, seen  # both states were read
    assert not torn, torn[:3]


def test_the_pages_answer_reads_one_state_for_models_and_rules(tmp_path):
    """/api/state read the daemon's state once for the models and again for the rules: a change
    between the two showed a model loading and its rule inactive. Here the state changes at
    every read."""
    from starlette.testclient import TestClient

    from monitord.output.dashboard import Dashboard

    config = load_config(write(tmp_path))
    models = load_models(config)
    daemon = Daemon(config, {"yam": models["yam"]}, loading={"clap"})
    loading = daemon.availability
    daemon.unavailable, daemon.loading = {"clap": ModelUnavailable("no", missing="the directory x")}, frozenset()
    daemon._update_inactive()
    failed = daemon.availability
    states = iter([loading, failed] * 10)

    class Flipping(SimpleNamespace):
        availability = property(lambda self: next(states))

    flipping = Flipping(config=config, clips=None, sources=[], models=daemon.models)
    state = TestClient(Dashboard(flipping, "127.0.0.1:1", None).app(), base_url="http://127.0.0.1:8080").get("/api/state").json()
    rule = {r["id"]: r for r in state["rules"]}["cat-confirmed"]
    assert state["models"]["clap"]["state"] == rule["state"] == "loading", (state["models"]["clap"], rule)



def test_try_it_offers_the_models_the_same_answer_shows_loaded(tmp_path):
    """/api/state took its try-it list from the daemon's models, not from the state it read for the
    models panel: a model joining between the two was offered to try while shown loading."""
    from starlette.testclient import TestClient

    from monitord.output.dashboard import Dashboard

    config = load_config(write(tmp_path))
    yam = SimpleNamespace(device="cpu", model_id="yamnet:builtin", labels=("Cat",))
    clap = SimpleNamespace(device="cpu", model_id="laion/clap", labels=("cat meowing",))
    loading = Availability(config, {"yam": yam}, {}, {"clap": "loading"}, {}, frozenset({"clap"}), frozenset())
    joined = Availability(config, {"yam": yam, "clap": clap}, {}, {}, {}, frozenset(), frozenset())
    states = iter([loading, joined] * 10)

    class Joining(SimpleNamespace):
        availability = property(lambda self: next(states))

    daemon = Joining(config=config, clips=None, sources=[], models=joined.models)  # the model joined meanwhile
    state = TestClient(Dashboard(daemon, "127.0.0.1:1", None).app(), base_url="http://127.0.0.1:8080").get("/api/state").json()
    shown = {name for name, m in state["models"].items() if m["state"] == "active"}
    assert set(state["try_it"]) == shown == {"yam"}, (state["try_it"], state["models"])


def test_an_upload_is_scored_by_the_models_its_request_was_checked_against(tmp_path):
    """The upload's answer checked its labels against one state (no CLAP yet: one label is fine for
    YAMNet) and scored with another read later (CLAP joined): CLAP scored a single label, whose
    softmax is 1.0 whatever the sound."""
    import asyncio
    import io

    from monitord.output.dashboard import Dashboard, Handlers

    config = load_config(write(tmp_path))
    yam = SimpleNamespace(device="cpu", model_id="yamnet:builtin", labels=("Cat",))
    clap = SimpleNamespace(device="cpu", model_id="laion/clap", labels=("cat meowing",))
    loading = Availability(config, {"yam": yam}, {}, {"clap": "loading"}, {}, frozenset({"clap"}), frozenset())
    joined = Availability(config, {"yam": yam, "clap": clap}, {}, {}, {}, frozenset(), frozenset())
    states = iter([loading] + [joined] * 10)

    class Joining(SimpleNamespace):
        availability = property(lambda self: next(states))

    dashboard = Dashboard(Joining(config=config, clips=None, sources=[], models=joined.models), "127.0.0.1:1", None)
    used = {}

    def cut(file, models):  # where the models to score with are known: stop there
        used.update(models)
        raise ValueError("stop here")

    dashboard._cut_upload = cut
    form = {"file": SimpleNamespace(read=lambda *a: b"", file=io.BytesIO(b"x")), "labels": "dog"}
    answer = asyncio.run(Handlers(dashboard).answer_upload(form))
    assert answer.status_code == 400 and sorted(used) == ["yam"], (answer.body, sorted(used))
