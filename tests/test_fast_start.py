"""A fast first start (issue #26): what a config does not use is not imported, and an optional model
whose weights are not there is known to be absent before torch and transformers are imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, silence, write_wav

CLASSIFY_CONFIG = """
sources: [{{id: f, file: clip.wav}}]
gate: {{mode: always}}
models:
  yam: {{kind: yamnet, groups: {{cat: [Cat, Meow]}}}}
{clap}
rules:
  - {{id: cat, model: yam, label: cat, threshold: 0.3}}
publish: {{endpoint: "tcp://127.0.0.1:5599", event_log: events.jsonl}}
"""

CLAP = """  clap:
    kind: clap
    model: {model}
    optional: {optional}
    labels: [cat meowing, speech, silence]
"""


def config_with(tmp_path: Path, clap: str = "") -> Path:
    write_wav(tmp_path / "clip.wav", silence(2.5, 16000), 16000)
    path = tmp_path / "c.yaml"
    path.write_text(CLASSIFY_CONFIG.format(clap=clap))
    return path


def run_cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, set[str], str, str]:
    """``monitord ARGS`` in a fresh interpreter (offline, an empty Hugging Face cache): its exit
    status, the modules it had imported when it returned, its stdout and stderr."""
    code = ("import json, sys\nfrom monitord.cli import main\nrc = main(sys.argv[1:])\n"
            "print('MODULES ' + json.dumps(sorted(sys.modules)), file=sys.stderr)\nsys.exit(rc)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), **(env or {})}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    line = next((ln for ln in out.stderr.splitlines() if ln.startswith("MODULES ")), None)
    assert line is not None, out.stderr[-3000:]
    return out.returncode, set(json.loads(line[len("MODULES "):])), out.stdout, out.stderr


HEAVY = {"torch", "transformers"}


@pytest.mark.parametrize("model", ["laion/clap-htsat-unfused", "./no-such-clap"])
def test_classify_with_an_absent_optional_clap_imports_neither_torch_nor_transformers(tmp_path, model):
    config = config_with(tmp_path, CLAP.format(model=model, optional="true"))
    code, modules, stdout, stderr = run_cli(tmp_path, "classify", "-c", str(config), str(tmp_path / "clip.wav"))
    assert code == 0, stderr[-3000:]
    assert not HEAVY & modules, sorted(HEAVY & modules)
    assert stdout.strip(), "no windows were classified"
    said = next(ln for ln in stderr.splitlines() if "optional model clap is not loaded" in ln)
    if model.startswith("."):
        assert "the directory" in said and "no-such-clap" in said and "--local-dir" in said
    else:  # what load_pretrained says after from_pretrained failed, word for word
        assert f"{model} is not in the Hugging Face cache and HF_HUB_OFFLINE is set. Fix: on a machine that reaches the hub, `" in said
        assert f"download {model}` (then copy HF_HOME's hub cache here)" in said


def test_classify_on_files_it_cannot_read_says_so_before_loading_a_model(tmp_path, random_clap):
    """A CLAP that is there (it would import torch and transformers to load): bad files alone are
    refused first, each named; a readable one beside them still loads the models and is classified."""
    config = config_with(tmp_path, CLAP.format(model=random_clap, optional="false"))
    (tmp_path / "text.wav").write_text("this is not audio\n" * 100)
    bad = [str(tmp_path / "text.wav"), str(tmp_path / "missing.wav")]
    code, modules, stdout, stderr = run_cli(tmp_path, "classify", "-c", str(config), *bad)
    assert code == 2 and not HEAVY & modules, (code, sorted(HEAVY & modules), stderr[-2000:])
    assert all(f"cannot read audio file {path}" in stderr for path in bad), stderr[-2000:]
    code, modules, stdout, stderr = run_cli(tmp_path, "classify", "-c", str(config), *bad, str(tmp_path / "clip.wav"))
    assert code == 2 and HEAVY <= modules and "clip.wav" in stdout, stderr[-2000:]
    assert all(stderr.count(f"cannot read audio file {path}") == 1 for path in bad), stderr[-2000:]


def test_a_required_absent_clap_fails_with_the_same_reason_and_no_torch(tmp_path):
    config = config_with(tmp_path, CLAP.format(model="laion/clap-htsat-unfused", optional="false"))
    code, modules, _, stderr = run_cli(tmp_path, "classify", "-c", str(config), str(tmp_path / "clip.wav"))
    assert code == 2 and "CLAP processor: cannot load 'laion/clap-htsat-unfused'" in stderr, stderr[-3000:]
    assert "Hugging Face cache (HF_HUB_OFFLINE is set)" in stderr
    assert not HEAVY & modules, sorted(HEAVY & modules)


def test_yamnet_only_and_check_config_import_neither(tmp_path):
    config = config_with(tmp_path)
    code, modules, stdout, stderr = run_cli(tmp_path, "classify", "-c", str(config), str(tmp_path / "clip.wav"))
    assert code == 0 and stdout.strip(), stderr[-3000:]
    assert not HEAVY & modules, sorted(HEAVY & modules)
    config = config_with(tmp_path, CLAP.format(model="laion/clap-htsat-unfused", optional="true"))
    code, modules, stdout, stderr = run_cli(tmp_path, "check-config", str(config))
    assert code == 0 and ": ok (" in stdout, stderr[-3000:]
    assert not HEAVY & modules, sorted(HEAVY & modules)


def test_a_snapshot_in_the_cache_is_left_to_transformers(tmp_path):
    """The pre-check refuses only what is surely absent: with a snapshot of the id in the cache (here an
    empty one, as a download that stopped half-way leaves), transformers is asked, and says why not."""
    snapshot = tmp_path / "hf-home" / "hub" / "models--laion--clap-htsat-unfused" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    config = config_with(tmp_path, CLAP.format(model="laion/clap-htsat-unfused", optional="true"))
    code, modules, _, stderr = run_cli(tmp_path, "classify", "-c", str(config), str(tmp_path / "clip.wav"))
    assert code == 0, stderr[-3000:]
    assert "transformers" in modules and "optional model clap is not loaded" in stderr


# --- `monitord run`: optional models load in the background, after the start -------------------------

import logging  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

from tests.conftest import AUDIO, free_port, shared_path, time_scale, wait_until  # noqa: E402

ALARM = AUDIO / "alarm_clock" / "esc50_alarm_clock_3-120526-B-37.wav"

RUN_CONFIG = """
sources: [{{id: room, file: alarms.wav, realtime: true}}]
gate: {{mode: energy, threshold_dbfs: -60}}
models:
  yam: {{kind: yamnet, groups: {{alarm: ["Alarm clock", Alarm, "Beep, bleep", Buzzer]}}}}
  clap:
    kind: clap
    model: {clap}
    optional: true
    labels: [alarm clock, speech, silence]{gate}
rules:
  - {{id: alarm, model: yam, label: alarm, threshold: 0.3, release: 0.1, cooldown_s: 1}}
  - {{id: alarm-clap, model: clap, label: alarm clock, threshold: 0.5, not_like: {{reference: smoke-alarm}}}}
http: {{bind: "127.0.0.1:{http}"}}
publish: {{endpoint: "tcp://127.0.0.1:{port}", event_log: events.jsonl}}
"""


class SlowLoad:
    """build_model as ``monitord run`` calls it, but the CLAP model waits for ``release`` (held by the
    test) before it is built, for real, from the tiny checkpoint; with ``fail`` it raises instead."""

    def __init__(self, monkeypatch, fail: bool = False):
        import monitord.inference.build as build

        self.real = build.build_model
        self.began, self.release, self.built = threading.Event(), threading.Event(), threading.Event()
        self.fail = fail
        monkeypatch.setattr(build, "build_model", self)

    def __call__(self, name, config):
        if config.kind == "clap":
            self.began.set()
            self.release.wait()
            if self.fail:
                from monitord.inference.models import ModelUnavailable

                raise ModelUnavailable("CLAP model: the test refused it", missing="the test's CLAP", fix="let it load")
            try:
                return self.real(name, config)
            finally:
                self.built.set()
        return self.real(name, config)


@pytest.fixture
def slow_load(monkeypatch):
    """A SlowLoad (``fail`` settable); at the end its load is let go and its thread waited for (a
    torch thread still busy when the interpreter exits aborts it)."""
    from monitord.daemon import LOADER_THREAD

    load = SlowLoad(monkeypatch)
    yield load
    load.release.set()
    assert wait_until(lambda: not any(t.name == LOADER_THREAD for t in threading.enumerate()), 120 * time_scale())


def run_config(tmp_path: Path, clap: Path, gated: bool = False) -> tuple[Path, str]:
    data, rate = sf.read(str(shared_path(ALARM)), dtype="float32", always_2d=True)
    write_wav(tmp_path / "alarms.wav", np.tile(data.mean(axis=1), 40), rate)  # 200 s: it outlasts every test
    http = free_port()
    path = tmp_path / "run.yaml"
    gate = "\n    gated_by: {model: yam, labels: [alarm], threshold: 0.05}" if gated else ""
    path.write_text(RUN_CONFIG.format(clap=clap, http=http, port=free_port(), gate=gate))
    return path, f"http://127.0.0.1:{http}/"


def run_handler(signum: int, before: object):
    """The handler ``monitord run`` installed for ``signum`` (None while it has none: ``before`` is the
    one the test had, SIG_IGN/SIG_DFL are not callable)."""
    handler = signal.getsignal(signum)
    return handler if callable(handler) and handler is not before else None


def run_in_process(config: Path, check) -> tuple[int, float]:
    """``monitord run -c CONFIG`` in this process, on its main thread (it installs signal handlers),
    while ``check()`` runs on another; once ``check`` returned or failed (its exception is raised
    here), run is stopped as a SIGTERM stops it. Returns the exit status and how long it took to stop.

    No real signal is sent: run's own SIGTERM handler is called, from the checker. A signal to this
    process (a test worker) that met any other disposition (the default, before run installs its
    handler or after the test's came back) would end the worker, and with it xdist's run."""
    from monitord.cli import main

    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    saved = {s: signal.getsignal(s) for s in signals}
    failures: list[BaseException] = []
    sent: list[float] = []
    returned = threading.Event()

    def checker() -> None:
        try:
            check()
        except BaseException as exc:  # noqa: BLE001 - raised again on the test's thread
            failures.append(exc)
        finally:
            wait_until(lambda: returned.is_set() or run_handler(signal.SIGTERM, saved[signal.SIGTERM]), 60 * time_scale())
            handler = run_handler(signal.SIGTERM, saved[signal.SIGTERM])
            if not returned.is_set() and handler is not None:
                sent.append(time.monotonic())
                handler(signal.SIGTERM, None)  # a late call (run has returned) only sets a stop already set

    thread = threading.Thread(target=checker, name="check", daemon=True)
    thread.start()
    code = None
    try:
        code = main(["run", "-c", str(config)])
    finally:
        returned_at = time.monotonic()
        returned.set()
        thread.join()  # its waits are bounded
        for s, handler in saved.items():
            signal.signal(s, handler)
    if failures:
        raise failures[0]
    assert sent, f"monitord run returned (exit status {code}) before the check had ended"
    return code, returned_at - sent[0]


def get_state(url: str) -> dict | None:
    try:
        return json.loads(urllib.request.urlopen(url + "api/state", timeout=5).read())
    except OSError:
        return None


def logged(path: Path, kind: str, **match) -> list[dict]:
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in events if e["kind"] == kind and all(e.get(k) == v for k, v in match.items())]


@pytest.mark.parametrize("gated", [False, True], ids=["alone", "second-tier"])
def test_yamnet_alerts_and_the_dashboard_come_while_clap_loads_then_clap_scores(tmp_path, random_clap, slow_load, caplog,
                                                                                gated):
    """Also as shipped: CLAP gated by YAMNet, which makes it, once loaded, a tier on a thread of its own."""
    caplog.set_level(logging.INFO)
    load = slow_load
    config, url = run_config(tmp_path, random_clap, gated)
    events = tmp_path / "events.jsonl"
    bound = 60 * time_scale()

    def check() -> None:
        try:
            assert wait_until(lambda: get_state(url) is not None, bound), "the dashboard did not answer while CLAP was loading"
            assert wait_until(load.began.is_set, bound) and not load.built.is_set()
            state = get_state(url)
            assert state["models"]["yam"]["state"] == "active"
            assert state["models"]["clap"]["state"] == "loading", state["models"]
            rules = {r["id"]: r for r in state["rules"]}
            assert rules["alarm"]["state"] == "active"
            assert rules["alarm-clap"]["state"] == "loading" and not rules["alarm-clap"]["active"]
            assert rules["alarm-clap"]["detail"] == "model clap is loading"
            assert wait_until(lambda: logged(events, "alert", rule="alarm", phase="onset"), bound), \
                "no YAMNet alert while CLAP was loading"
            assert not logged(events, "status", status="model_loaded") and not load.built.is_set()
            assert not logged(events, "status", status="model_unavailable")
            load.release.set()
            assert wait_until(lambda: logged(events, "status", status="model_loaded"), bound), "no model_loaded status"
            loaded, = logged(events, "status", status="model_loaded")
            assert loaded["model"] == "clap" and loaded["active_rules"] == ["alarm-clap"] and loaded["seconds"] > 0
            assert "optional model clap" in loaded["detail"] and "loaded in" in loaded["detail"]

            def clap_scored() -> bool:
                latest = (get_state(url) or {}).get("latest", [])
                return any(m.get("model_name") == "clap" and m.get("scores") for m in latest)

            assert wait_until(clap_scored, bound), "CLAP's scores never reached the dashboard"
            tier_thread = any(t.name.startswith("inference-clap") for t in threading.enumerate())
            assert tier_thread == gated, "CLAP added as a second tier scores on its own thread (and only then)"
            state = get_state(url)
            assert state["models"]["clap"]["state"] == "active"
            assert {r["id"]: r["state"] for r in state["rules"]} == {"alarm": "active", "alarm-clap": "active"}
            assert state["try_it"] == {"yam": "yamnet", "clap": "clap"}
            # its rule's references are embedded by it, after it joined (they are cut, then embedded between batches)
            assert wait_until(lambda: "references ready for rules alarm-clap" in caplog.text, bound), caplog.text[-2000:]
        finally:
            load.release.set()

    code, stopped_in = run_in_process(config, check)
    assert code == 0
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("fails", ["loading", "joining"])
def test_a_background_load_that_fails_says_model_unavailable(tmp_path, random_clap, slow_load, monkeypatch, fails):
    """It fails to load, or it loads and then cannot join the running pipeline (the scorer refuses
    it): either way a model_unavailable status, its rules inactive, not "loading" for ever."""
    load = slow_load
    if fails == "loading":
        load.fail = True
        missing_said, fix_said = "the test's CLAP", "let it load"
    else:
        from monitord.inference.scoring import Scorer

        def refuse(self, model):
            raise RuntimeError("the test's scorer refuses it")

        monkeypatch.setattr(Scorer, "add_model", refuse)
        missing_said, fix_said = "it failed to join (RuntimeError(\"the test's scorer refuses it\"))", "see the log"
    from monitord.windowing.tiling import WindowCutter

    cut = WindowCutter.cut
    judged_for: list[frozenset[str]] = []  # the models each window cut was judged (and resampled) for

    def recording_cut(self, *args, **kwargs):
        window = cut(self, *args, **kwargs)
        judged_for.append(frozenset(window.gates))
        return window

    monkeypatch.setattr(WindowCutter, "cut", recording_cut)
    config, url = run_config(tmp_path, random_clap)
    events = tmp_path / "events.jsonl"
    bound = 60 * time_scale()

    def check() -> None:
        try:
            assert wait_until(lambda: get_state(url) is not None, bound)
            assert get_state(url)["models"]["clap"]["state"] == "loading"
            load.release.set()
            assert wait_until(lambda: logged(events, "status", status="model_unavailable"), bound)
            missing, = logged(events, "status", status="model_unavailable")
            assert missing["model"] == "clap" and missing["missing"] == missing_said and missing["fix"] == fix_said, missing
            assert missing["inactive_rules"] == ["alarm-clap"]
            state = get_state(url)
            assert state["models"]["clap"]["state"] == "inactive" and missing_said in state["models"]["clap"]["detail"]
            rules = {r["id"]: r for r in state["rules"]}
            assert rules["alarm-clap"]["state"] == "inactive" and rules["alarm-clap"]["detail"] == "model clap is not loaded"
            assert rules["alarm"]["state"] == "active"
            assert not logged(events, "status", status="model_loaded")
            assert wait_until(lambda: logged(events, "alert", rule="alarm", phase="onset"), bound)  # YAMNet goes on
            # all or nothing: the windows cut since are not judged or resampled for a model that never scores
            judged_for.clear()
            assert wait_until(lambda: len(judged_for) >= 3, bound)
            assert all(models == {"yam"} for models in judged_for), judged_for
        finally:
            load.release.set()

    code, _ = run_in_process(config, check)
    assert code == 0


def reload_clap_labels(config: Path, labels: list[str], events: Path, bound: float) -> None:
    """CLAP's labels in the config file changed, then the reload a SIGHUP starts (run's own handler,
    called once run has installed it: after its dashboard is up); waits for the ``reloaded`` status."""
    config.write_text(config.read_text().replace("labels: [alarm clock, speech, silence]", f"labels: [{', '.join(labels)}]"))
    assert wait_until(lambda: run_handler(signal.SIGHUP, signal.SIG_IGN), bound)
    run_handler(signal.SIGHUP, signal.SIG_IGN)(signal.SIGHUP, None)
    assert wait_until(lambda: logged(events, "status", status="reloaded"), bound), logged(events, "status", status="reload_failed")


def test_a_reload_while_a_model_loads_reaches_it_before_it_joins(tmp_path, random_clap, slow_load, caplog):
    """The labels a SIGHUP reload sets while CLAP is still loading (built from the config read before)
    are the ones it scores with once it joins."""
    caplog.set_level(logging.INFO)
    load = slow_load
    config, url = run_config(tmp_path, random_clap)
    events = tmp_path / "events.jsonl"
    bound = 60 * time_scale()
    new_labels = ["alarm clock", "speech", "silence", "door knock"]

    def check() -> None:
        try:
            assert wait_until(lambda: get_state(url) is not None, bound)
            assert wait_until(load.began.is_set, bound) and not load.built.is_set()
            reload_clap_labels(config, new_labels, events, bound)
            load.release.set()
            assert wait_until(lambda: logged(events, "status", status="model_loaded"), bound), \
                logged(events, "status", status="model_unavailable")
            assert get_state(url)["models"]["clap"]["labels"] == new_labels

            def scored_labels() -> set[str]:
                latest = (get_state(url) or {}).get("latest", [])
                return {label for m in latest if m.get("model_name") == "clap" for label in (m.get("scores") or {})}

            assert wait_until(lambda: scored_labels() == set(new_labels), bound), scored_labels()
        finally:
            load.release.set()

    code, _ = run_in_process(config, check)
    assert code == 0
    assert "model clap: a reload changed its labels while it loaded" in caplog.text


def test_a_model_that_joins_while_a_reload_prepares_labels_scores_the_new_ones(tmp_path, random_clap, slow_load,
                                                                                monkeypatch):
    """CLAP finishes loading and joins (with the labels it was built with) after a reload prepared the
    labels of the models loaded before it, and before the reload swaps them in: the reload prepares
    again, and CLAP ends on the new labels."""
    from monitord.inference.worker import InferenceStage

    load = slow_load
    config, url = run_config(tmp_path, random_clap)
    events = tmp_path / "events.jsonl"
    bound = 60 * time_scale()
    new_labels = ["alarm clock", "speech", "silence", "door knock"]
    submit = InferenceStage.submit
    joined_before_swap = threading.Event()

    def clap_joins_first(self, fn, *args, **kwargs):  # the reload's swap waits until CLAP has joined
        if getattr(fn, "__name__", "") == "swap" and not load.release.is_set():
            load.release.set()
            if wait_until(lambda: logged(events, "status", status="model_loaded"), bound):
                joined_before_swap.set()
        return submit(self, fn, *args, **kwargs)

    monkeypatch.setattr(InferenceStage, "submit", clap_joins_first)

    def check() -> None:
        try:
            assert wait_until(lambda: get_state(url) is not None, bound)
            assert wait_until(load.began.is_set, bound)
            reload_clap_labels(config, new_labels, events, bound)
            assert joined_before_swap.is_set()
            assert get_state(url)["models"]["clap"]["labels"] == new_labels
        finally:
            load.release.set()

    code, _ = run_in_process(config, check)
    assert code == 0


def test_a_stop_while_a_model_loads_neither_waits_for_it_nor_takes_it_in(tmp_path, random_clap, slow_load, caplog):
    caplog.set_level(logging.INFO)
    load = slow_load
    config, url = run_config(tmp_path, random_clap)
    bound = 60 * time_scale()

    def check() -> None:
        assert wait_until(lambda: get_state(url) is not None, bound)
        assert wait_until(load.began.is_set, bound)

    code, stopped_in = run_in_process(config, check)  # the load is still waiting on release
    assert code == 0 and not load.built.is_set()
    assert stopped_in < 15 * time_scale(), f"stopping took {stopped_in:.1f} s"
    load.release.set()  # the load ends after the stop: the model is built, then dropped
    assert load.built.wait(bound)
    assert wait_until(lambda: not any(t.name == "load-models" for t in threading.enumerate()), bound)
    assert "model clap: loaded after the stop began; dropped" in caplog.text
    assert "Traceback" not in caplog.text and "loading failed" not in caplog.text


BUSY_LOAD = """
import sys
import monitord.inference.build as build

real = build.build_model


def busy(name, config):  # the model is built, then torch's threads stay busy, as while CLAP times its dtypes
    model = real(name, config)
    if config.kind != "clap":
        return model
    import torch

    print("BUSY", file=sys.stderr, flush=True)
    while True:
        torch.randn(256, 256) @ torch.randn(256, 256)


build.build_model = busy
sys.argv = ["monitord", "run", "-c", sys.argv[1]]
from monitord.cli import main

sys.exit(main())
"""


def test_a_stop_while_torch_is_busy_loading_exits_cleanly(tmp_path, random_clap):
    """The process itself (``main()`` with its own command line): SIGTERM while the background load
    keeps torch's threads busy exits with status 0 at once, not with an abort at the interpreter's end."""
    config, url = run_config(tmp_path, random_clap)
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOAD, str(config)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        assert wait_until(lambda: "BUSY\n" in lines or proc.poll() is not None, 120 * time_scale()), "".join(lines)[-3000:]
        assert proc.poll() is None, "".join(lines)[-3000:]
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30 * time_scale())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    err = "".join(lines)
    assert code == 0, err[-3000:]
    assert "terminate called" not in err and "Traceback" not in err, err[-3000:]
    assert "stopped:" in err
