"""Configs written to break things: what check-config accepts, `run` starts (or it exits 2 naming
the key); duplicate keys; credentials in clear text; state kept where a service keeps state; and
the config package importing nothing above it."""

from __future__ import annotations

import ast
import copy
import os
import subprocess
import textwrap
import threading
import types
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from monitord.config import ConfigError, load_config, load_serve_config, parse_config
from tests.conftest import REPO, monitord_cmd

BASE = """
sources: [{id: a, device: default}]
models: {yam: {kind: yamnet, groups: {glass: [Glass]}}}
rules: [{id: glass-break, model: yam, label: glass, threshold: 0.3}]
"""


def refused(text: str, base_dir: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), base_dir)
    return [str(p) for p in info.value.problems]


# the import circle


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_config_package_imports_nothing_from_serve_and_the_wire_format_nothing_from_config():
    config_files = sorted((REPO / "monitord" / "config").glob("*.py"))
    upward = {f.name: sorted(m for m in _imports(f) if m.startswith("monitord.serve")) for f in config_files}
    assert not any(upward.values()), f"monitord.config imports monitord.serve: {upward}"
    wire = _imports(REPO / "monitord" / "inference" / "wire.py")
    assert not any(m == "monitord.config" or m.startswith("monitord.config.") for m in wire), sorted(wire)


def test_the_old_import_names_still_work():
    from monitord.config import yamnet_class_names
    from monitord.inference.wire import MIN_TOKEN_CHARS, TokenFileError, read_token  # noqa: F401

    assert yamnet_class_names(None)[:2] == ("Speech", "Child speech, kid speaking")
    assert MIN_TOKEN_CHARS == 16


# duplicate keys


def test_a_second_rules_block_is_refused_not_merged(tmp_path):
    text = BASE + "publish: {endpoint: 'tcp://127.0.0.1:5556'}\nrules: [{id: other, model: yam, label: glass, threshold: 0.5}]\n"
    found = refused(text, tmp_path)
    assert "rules: duplicate key 'rules' (line 6; first at line 4)" in found, found


def test_duplicate_keys_are_refused_at_any_depth(tmp_path):
    text = """
    sources:
      - id: a
        device: default
        id: b
    models:
      yam:
        kind: yamnet
        groups: {glass: [Glass], glass: [Shatter]}
    """
    found = refused(text, tmp_path)
    assert "sources.0.id: duplicate key 'id' (line 5; first at line 3)" in found, found
    assert "models.yam.groups.glass: duplicate key 'glass' (line 9; first at line 9)" in found, found


def test_yaml_merge_keys_still_work(tmp_path):
    text = BASE.replace("rules: [", "rules: [&common ")
    text = text.replace("threshold: 0.3}]", "threshold: 0.3}, {<<: *common, id: glass-2, threshold: 0.5}]")
    config = parse_config(text, tmp_path)
    assert [(r.id, r.threshold) for r in config.rules] == [("glass-break", 0.3), ("glass-2", 0.5)]


@pytest.mark.timeout(60)
def test_a_yaml_alias_bomb_is_refused_quickly_in_little_memory(tmp_path):
    """Billion laughs: 9 aliases of 9 aliases... PyYAML shares them, but writing the refused value
    out whole in the message took 35 s and 400 MB at 9 levels, and grows 9x a level."""
    import resource
    import time

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 12)]
    text = "\n".join(lines) + "\n" + BASE + "publish: *a11\n"
    before, began = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
    found = refused(text, tmp_path)
    assert time.monotonic() - began < 10 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000
    assert any(p.startswith("publish: ") and len(p) < 300 for p in found), found


@pytest.mark.parametrize("depth", [200, 100_000])
def test_yaml_nested_too_deeply_is_a_config_error_not_a_traceback(tmp_path, depth):
    found = refused(BASE + "publish: " + "[" * depth + "]" * depth + "\n", tmp_path)
    assert found and all(p.startswith(("publish", "config")) for p in found), found


def test_a_config_that_is_no_file_or_far_too_big_is_refused_naming_it(tmp_path):
    """/dev/zero was read until memory ran out; a directory or bytes that are no UTF-8 name the file."""
    huge = tmp_path / "huge.yaml"
    with open(huge, "wb") as f:
        f.truncate(64 * 2**20)  # sparse: costs no disk
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(BASE.encode() + b"# caf\xe9\n")
    for path in (Path("/dev/zero"), huge, tmp_path, bad):
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert str(path) in str(info.value), info.value


@pytest.mark.timeout(60)
def test_100000_clap_labels_are_checked_in_linear_time(tmp_path):
    """The duplicate check counted each label through the whole list: 30000 labels took 40 s, 100000 minutes."""
    import time

    from pydantic import ValidationError

    from monitord.config.schema import ClapModelConfig

    labels = [f"label {i}" for i in range(100_000)]
    began = time.monotonic()
    assert len(ClapModelConfig(labels=labels).labels) == 100_000
    with pytest.raises(ValidationError, match="duplicate labels: label 7 \\[type"):
        ClapModelConfig(labels=[*labels, "label 7"])
    assert time.monotonic() - began < 10  # YAML aside (PyYAML's own pace): under a second here, minutes before
    found = refused(BASE.replace("models: {", "models: {clap: {kind: clap, labels: [a, b, a]}, "), tmp_path)
    assert "models.clap.labels: duplicate labels: a (line 3)" in found, found


@pytest.mark.parametrize("prompt", ["{label} {label:>999999999}", "{label} {label.__class__.__mro__}", "{label} {0}",
                                    "{label} {label!r}", "{label} {other}"])
def test_a_clap_prompt_may_use_only_label_itself(tmp_path, prompt):
    """A format spec passed the old check (it formatted the prompt: a gigabyte for the width above,
    there and again per label at load); attribute access reached into the label's class."""
    found = refused(BASE.replace("models: {", f"models: {{clap: {{kind: clap, labels: [a, b], prompt: '{prompt}'}}, "), tmp_path)
    assert any(p.startswith("models.clap.prompt: ") for p in found), found
    parse_config(BASE.replace("models: {", "models: {clap: {kind: clap, labels: [a, b], prompt: '{{{label}}} is {label}'}, "), tmp_path)


def test_a_clap_label_longer_than_the_text_tower_and_many_labels_load(random_clap, tmp_path):
    """check-config accepts any label; one longer than the text tower's positions failed the model's
    load (IndexError deep in torch: `run` could not start), as a typed try-it label failed the request.
    Many labels are embedded a pass at a time, each as it is alone."""
    import torch

    from monitord.inference.models import build_model
    from monitord.inference.models.clap import LABELS_PER_PASS

    long = " ".join(["word"] * 300)
    many = [f"label {i}" for i in range(LABELS_PER_PASS + 3)]
    config = parse_config(BASE.replace("models: {", f"models: {{clap: {{kind: clap, model: '{random_clap}', "
                                                    f"labels: [tone, '{long}']}}, "), tmp_path)
    model = build_model("clap", config.models["clap"])
    assert tuple(model.text_embeddings.shape)[0] == 2
    _, _, embeddings = model.prepare_labels(many, model.prompt)
    _, _, few = model.prepare_labels(many[:2] + many[-2:], model.prompt)
    assert tuple(embeddings.shape)[0] == len(many)
    torch.testing.assert_close(embeddings[[0, 1, -2, -1]], few, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("value", ["/tmp/" + "a" * 5000, "a" * 5000, "/tmp/a\0b", "a\0b"])
@pytest.mark.parametrize("key", ["sources.0.file", "models.yam.model", "models.yam.class_map", "publish.mqtt.password_file",
                                 "serve.token_file", "models.clap.model"])
def test_a_path_too_long_to_look_up_or_with_a_nul_is_a_config_error_naming_the_key(tmp_path, key, value):
    """Path.is_file raises for a name the file system cannot look up (ENAMETOOLONG) and for a NUL
    byte: check-config ended in a traceback instead of naming the key."""
    data = yaml.safe_load(BASE)
    data["models"]["clap"] = {"kind": "clap", "labels": ["a", "b"]}
    data["publish"] = {"mqtt": {"host": "127.0.0.1"}}
    where = data
    parts = [int(p) if p.isdigit() else p for p in key.split(".")]
    for part in parts[:-1]:
        where = where.setdefault(part, {}) if isinstance(where, dict) else where[part]
    where[parts[-1]] = value
    if key.endswith(".model") and "\0" not in value:  # a model not there is reported when it is loaded
        parse_config(yaml.safe_dump(data), tmp_path)
        return
    found = refused(yaml.safe_dump(data), tmp_path)
    assert any(p.startswith(key + ": ") for p in found), found


def test_check_config_names_the_duplicate_key_and_exits_2(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(BASE + "rules: []\n")
    out = subprocess.run(monitord_cmd("check-config", str(path)), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    assert "rules: duplicate key 'rules' (line 5; first at line 4)" in out.stderr and "Traceback" not in out.stderr


def test_run_and_a_reload_refuse_a_duplicate_key_too(tmp_path):
    from monitord.cli import _reload

    path = tmp_path / "c.yaml"
    path.write_text(BASE + "rules: []\n")
    out = subprocess.run(monitord_cmd("run", "-c", str(path)), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "rules: duplicate key 'rules' (line 5; first at line 4)" in out.stderr, out.stderr

    class Running:  # the daemon a SIGHUP reaches: what it is told
        statuses: list = []

        def status(self, source, status, detail):
            self.statuses.append((status, detail))

        def apply_reload(self, new):
            raise AssertionError("a config with a duplicate key was applied")

    daemon = Running()
    _reload(daemon, str(path), lambda state: None)
    assert [s for s, _ in daemon.statuses] == ["reload_failed"] and "duplicate key 'rules'" in daemon.statuses[0][1]


# MQTT credentials


def test_a_remote_mqtt_broker_without_tls_is_refused(tmp_path):
    found = refused(BASE + "publish: {mqtt: {host: broker.example.net}}\n", tmp_path)
    assert any(p.startswith("publish.mqtt.host: ") and "broker.example.net" in p and "publish.mqtt.tls" in p
               and "publish.mqtt.allow_insecure" in p for p in found), found


def test_a_remote_mqtt_broker_with_tls_or_allow_insecure_is_accepted_and_loopback_needs_neither(tmp_path, caplog):
    parse_config(BASE + "publish: {mqtt: {host: broker.example.net, tls: {}}}\n", tmp_path)
    parse_config(BASE + "publish: {mqtt: {host: 127.0.0.1}}\n", tmp_path)
    parse_config(BASE + "publish: {mqtt: {host: localhost}}\n", tmp_path)
    caplog.set_level("WARNING", logger="monitord.config")
    parse_config(BASE + "publish: {mqtt: {host: broker.example.net, allow_insecure: true}}\n", tmp_path)
    assert any(r.getMessage().startswith("publish.mqtt.allow_insecure: ") and "clear text" in r.getMessage()
               for r in caplog.records), caplog.records


def test_check_config_warns_about_insecure_mqtt_and_loose_secret_files(tmp_path):
    password = tmp_path / "mqtt.pass"
    password.write_text("secret\n")
    password.chmod(0o644)
    path = tmp_path / "c.yaml"
    path.write_text(BASE + "publish: {mqtt: {host: 10.1.2.3, allow_insecure: true, username: u, password_file: mqtt.pass}}\n")
    out = subprocess.run(monitord_cmd("check-config", str(path)), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "publish.mqtt.allow_insecure: " in out.stderr, out.stderr
    assert f"publish.mqtt.password_file: {password} is readable by group or others (mode 0644): chmod 600 it" in out.stderr
    password.chmod(0o600)
    out = subprocess.run(monitord_cmd("check-config", str(path)), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "password_file" not in out.stderr, out.stderr


def test_a_config_holding_the_dashboard_token_readable_by_others_is_warned_about(tmp_path, caplog):
    """http.token is written in the config itself: a world-readable config is then a world-readable secret."""
    path = tmp_path / "c.yaml"
    path.write_text(BASE + "http: {bind: '0.0.0.0:8080', token: a-long-enough-dashboard-token}\n")
    caplog.set_level("WARNING", logger="monitord.config")
    for mode, warned in ((0o644, True), (0o600, False)):
        caplog.clear()
        path.chmod(mode)
        load_config(path)
        found = [r.getMessage() for r in caplog.records if r.getMessage().startswith("http.token: ")]
        assert bool(found) is warned and (not warned or f"{path} is readable by group or others" in found[0]), (mode, found)


def test_a_token_file_readable_by_others_is_warned_about(tmp_path, caplog):
    token = tmp_path / "token"
    token.write_text("x" * 32)
    token.chmod(0o640)
    caplog.set_level("WARNING", logger="monitord.config")
    parse_config(BASE + "serve: {token_file: token}\n", tmp_path)
    assert any(r.getMessage().startswith(f"serve.token_file: {token} is readable by group or others (mode 0640): chmod 600 it")
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    caplog.clear()
    path = tmp_path / "serve.yaml"
    path.write_text(BASE + "serve: {token_file: token}\n")
    load_serve_config(path)  # what `monitord serve` reads
    assert any(r.getMessage().startswith("serve.token_file: ") for r in caplog.records), [r.getMessage() for r in caplog.records]


# state where a service keeps state


@pytest.fixture
def state_env(monkeypatch, tmp_path):
    """No state directory from the environment this test runs in; HOME in tmp_path."""
    for name in ("STATE_DIRECTORY", "XDG_STATE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def test_what_a_config_leaves_out_is_written_to_the_state_directory(tmp_path, state_env):
    text = BASE + "clips: {enabled: true}\n"
    config = parse_config(text, tmp_path / "etc")
    home_state = tmp_path / "home" / ".local" / "state" / "monitord"
    assert (config.publish.event_log, config.clips.dir) == (str(home_state / "events.jsonl"), str(home_state / "clips"))
    state_env.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert parse_config(text, tmp_path).publish.event_log == str(tmp_path / "xdg" / "monitord" / "events.jsonl")
    state_env.setenv("STATE_DIRECTORY", f"{tmp_path / 'systemd'}:{tmp_path / 'other'}")
    config = parse_config(text, tmp_path)
    assert (config.publish.event_log, config.clips.dir) == (str(tmp_path / "systemd" / "events.jsonl"), str(tmp_path / "systemd" / "clips"))


def test_a_relative_state_directory_is_ignored_like_a_relative_xdg_state_home(tmp_path, state_env):
    """A relative STATE_DIRECTORY (systemd never sets one) followed the working directory: `make
    run` in a checkout wrote its event log into the checkout."""
    state_env.setenv("STATE_DIRECTORY", "state")
    state_env.setenv("XDG_STATE_HOME", "also-relative")
    home_state = tmp_path / "home" / ".local" / "state" / "monitord"
    assert parse_config(BASE, tmp_path).publish.event_log == str(home_state / "events.jsonl")


def test_paths_a_config_gives_still_resolve_against_its_folder(tmp_path, state_env):
    state_env.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    config = parse_config(BASE + "publish: {event_log: log/e.jsonl}\nclips: {dir: /srv/clips}\n", tmp_path)
    assert (config.publish.event_log, config.clips.dir) == (str(tmp_path / "log" / "e.jsonl"), "/srv/clips")
    assert parse_config(BASE + "publish: {event_log: null}\n", tmp_path).publish.event_log is None


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "config").glob("[!.]*.yaml")))
def test_a_shipped_config_writes_nothing_into_the_checkout(name, tmp_path, state_env):
    from monitord.output.mqtt import state_path_for

    state_env.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    config = load_config(REPO / "config" / name)
    written = [config.publish.event_log, config.clips.dir, state_path_for(config.publish.event_log)]
    state = tmp_path / "xdg" / "monitord"
    assert all(Path(p).is_relative_to(state) for p in written if p is not None), written


def test_make_run_writes_its_event_log_to_the_state_directory_not_the_checkout(tmp_path, state_env):
    """`make run`'s config (on free ports, its source a file), run by the real daemon: the log lands in the state directory."""
    from tests.conftest import free_port, silence, write_wav

    text = (REPO / "config" / "monitord.yaml").read_text()
    text = text.replace("127.0.0.1:8080", f"127.0.0.1:{free_port()}").replace("tcp://127.0.0.1:5556", f"tcp://127.0.0.1:{free_port()}")
    text = text.replace("device: default", f"file: {write_wav(tmp_path / 'quiet.wav', silence(3.0, 16000), 16000)}")
    text = text.replace("retry: true", "realtime: false").replace("sample_rate: 48000", "")
    config = REPO / "config" / f".test-{os.getpid()}.yaml"  # in config/, as `make run` has it: relative paths resolve there
    config.write_text(text)
    before = {p.name for p in (REPO / "config").iterdir()}
    try:
        out = subprocess.run(monitord_cmd("run", "-c", str(config), "--until-done"), cwd=REPO, capture_output=True, text=True,
                             timeout=180, env={**os.environ, "STATE_DIRECTORY": str(tmp_path / "state"), "HF_HUB_OFFLINE": "1"})
    finally:
        config.unlink()
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "state" / "events.jsonl").stat().st_size > 0
    assert {p.name for p in (REPO / "config").iterdir()} == before - {config.name}


# numbers: whatever check-config accepts, `run` builds (or it exits 2 naming the key)


def test_an_infinite_log_size_and_a_huge_send_hwm_are_refused_naming_the_key(tmp_path):
    found = refused(BASE + "publish: {event_log_max_mb: .inf}\n", tmp_path)
    assert any(p.startswith("publish.event_log_max_mb: ") for p in found), found
    for hwm in ("1e20", "1.0e+20", str(2**63), str(2**31)):  # ZeroMQ's hwm is a C int
        found = refused(BASE + f"publish: {{send_hwm: {hwm}}}\n", tmp_path)
        assert any(p.startswith("publish.send_hwm: ") for p in found), (hwm, found)
    found = refused(BASE + "pipeline: {overload_status_interval_s: .nan}\n", tmp_path)
    assert any(p.startswith("pipeline.overload_status_interval_s: ") for p in found), found


def test_a_window_queue_that_would_fill_the_memory_is_refused_naming_its_keys(tmp_path):
    found = refused(BASE + "pipeline: {queue_max_windows: 100000}\nclips: {enabled: true}\n", tmp_path)
    assert any(p.startswith("pipeline.queue_max_windows: this config's buffers need about ") and "GiB" in p
               and "pipeline.memory_budget_mb" in p and "window.hop_s" in p for p in found), found
    found = refused(BASE + "pipeline: {queue_max_windows: 100000}\n", tmp_path)  # no clips: the queue itself
    assert any(p.startswith("pipeline.queue_max_windows: ") and "window queue" in p for p in found), found


def test_the_memory_budget_is_the_config_s_to_raise(tmp_path):
    from monitord.config.memory import shares

    config = parse_config(BASE + "pipeline: {queue_max_windows: 2000, memory_budget_mb: 4096}\n", tmp_path)
    queue = next(s for s in shares(config) if s.what == "window queue")
    assert queue.bytes == 2000 * 2 * 48000 * 4 + 2000 * 2 * 16000 * 4  # a 48 kHz window and its 16 kHz copy for YAMNet
    assert refused(BASE + "pipeline: {queue_max_windows: 2000}\n", tmp_path)


def test_the_shipped_configs_fit_the_default_budget():
    from monitord.config.memory import shares

    for path in sorted((REPO / "config").glob("[!.]*.yaml")):
        config = load_config(path)
        assert sum(s.bytes for s in shares(config)) < 64 * 2**20, (path.name, shares(config))


def _run_exits_2(tmp_path: Path, extra: str) -> str:
    from tests.conftest import silence, write_wav

    wav = write_wav(tmp_path / "quiet.wav", silence(3.0, 16000), 16000)
    path = tmp_path / "c.yaml"
    path.write_text(f"sources: [{{id: a, file: {wav}}}]\nmodels: {{yam: {{kind: yamnet}}}}\n{extra}")
    out = subprocess.run(monitord_cmd("run", "-c", str(path), "--until-done"), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return out.stderr


@pytest.mark.parametrize("extra, key", [
    ("publish: {event_log: e.jsonl, event_log_max_mb: .inf}\n", "publish.event_log_max_mb: "),
    ("publish: {event_log: e.jsonl, send_hwm: 1e20}\n", "publish.send_hwm: "),
    ("publish: {event_log: e.jsonl, send_hwm: 9223372036854775808}\n", "publish.send_hwm: "),
    ("publish: {event_log: e.jsonl}\npipeline: {queue_max_windows: 100000}\nclips: {enabled: true, dir: clips}\n",
     "pipeline.queue_max_windows: "),
])
def test_run_exits_2_naming_the_key_instead_of_a_traceback(tmp_path, extra, key):
    assert key in _run_exits_2(tmp_path, extra)


# the property: over every numeric key of the schema


EXTREMES = (0, -1, 1e-300, 0.5, 1.5, 1e20, 2**31, 2**63, float("inf"), float("-inf"), float("nan"))


def _members(annotation) -> list:
    """The types inside Optional, Union and Annotated."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _members(a)]
    return [annotation]


def _is_number(annotation) -> bool:
    members = [m for m in _members(annotation) if m is not type(None)]
    return bool(members) and all(m in (int, float) for m in members)


def _submodel(annotation, value):
    """The pydantic class ``value`` (a mapping) is validated as, under ``annotation``."""
    classes = [m for m in _members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]
    if len(classes) > 1 and isinstance(value, dict):  # the models union: by kind (clap when absent)
        classes = [c for c in classes if value.get("kind", "clap") in typing.get_args(c.model_fields["kind"].annotation)]
    return classes[0] if classes else None


def numeric_keys(cls, data: dict, path: tuple = ()) -> list[tuple[tuple, object]]:
    """(path in ``data``, FieldInfo) of every int/float key of ``cls`` and of the sections ``data``
    holds, walking the pydantic models themselves: a key added to the schema is drawn too."""
    found = []
    for name, field in cls.model_fields.items():
        if _is_number(field.annotation):
            found.append(((*path, name), field))
            continue
        value = data.get(name)
        for member in _members(field.annotation):
            origin, args = typing.get_origin(member), typing.get_args(member)
            if origin is tuple and isinstance(value, list):
                items = [((*path, name, i), args[0], item) for i, item in enumerate(value)]
            elif origin is dict and isinstance(value, dict):
                items = [((*path, name, k), args[1], item) for k, item in value.items()]
            elif isinstance(value, dict) and origin is None:
                items = [((*path, name), member, value)]
            else:
                continue
            for where, annotation, item in items:
                sub = _submodel(annotation, item) if isinstance(item, dict) else None
                if sub is not None:
                    found += numeric_keys(sub, item, where)
    return found


def reachable_sections(annotation, seen: set | None = None) -> set:
    """Every pydantic class a config may hold, from the annotations alone."""
    seen = set() if seen is None else seen
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            if member not in seen:
                seen.add(member)
                for field in member.model_fields.values():
                    reachable_sections(field.annotation, seen)
        else:
            for arg in typing.get_args(member):
                reachable_sections(arg, seen)
    return seen


def hostile_base(folder: Path) -> dict:
    """A valid config holding every section and every kind of model, all of it local: a file
    source, ipc sockets and every file in ``folder``."""
    from monitord.config.schema import MODEL_KINDS, RuleConfig
    from tests.conftest import silence, write_wav

    folder.mkdir(exist_ok=True)
    wav = write_wav(folder / "a.wav", silence(1.0, 16000), 16000)
    for name in ("bank.npz", "not-like.npz", "mqtt.pass"):
        (folder / name).write_bytes(b"x")
    token = folder / "token"
    token.write_text("t" * 32)
    for path in (token, folder / "mqtt.pass"):
        path.chmod(0o600)
    models = {
        "yam": {"kind": "yamnet", "groups": {"glass": ["Glass"]}, "gate": {"mode": "periodic"}},
        "clap": {"kind": "clap", "model": "laion/clap-htsat-unfused", "labels": ["a", "b"],
                 "gated_by": {"model": "yam", "labels": ["glass"], "threshold": 0.1}},
        "emo": {"kind": "emotion", "model": "superb/wav2vec2-base-superb-er", "granularity": "frame"},
        "anom": {"kind": "anomaly", "embedding_model": "clap", "bank": str(folder / "bank.npz")},
        "ex": {"kind": "examples", "bank": str(folder / "bank.npz"), "labels": ["door"], "embedding_model": "yam"},
    }
    rules = [
        {"id": "glass", "model": "yam", "label": "glass", "threshold": 0.3, "release": 0.2, "min_windows": 1, "of_windows": 2,
         "cooldown_s": 30, "not_like": {"bank": str(folder / "not-like.npz")}},
        {"id": "happy", "model": "emo", "label": "happy", "threshold": 0.5, "smooth_s": 0.2, "hold_s": 1.0},
    ]
    if "not_like" not in RuleConfig.model_fields:
        del rules[0]["not_like"]
    return {
        "sources": [{"id": "a", "file": str(wav), "gate": {"mode": "energy"}}],
        "gate": {"mode": "speech"},
        "window": {"seconds": 2.0, "hop_s": 0.5},
        "models": {name: m for name, m in models.items() if m["kind"] in MODEL_KINDS},
        "rules": rules,
        "publish": {"endpoint": f"ipc://{folder}/pub", "replay_endpoint": f"ipc://{folder}/replay",
                    "event_log": str(folder / "events.jsonl"),
                    "mqtt": {"host": "127.0.0.1", "username": "u", "password_file": str(folder / "mqtt.pass"), "tls": {}}},
        "pipeline": {},
        "clips": {"enabled": True, "dir": str(folder / "clips")},
        "metrics": {},
        "http": {},
        "inference": {"url": "http://127.0.0.1:9/monitord", "models": ["clap"], "token_file": str(token)},
        "serve": {"token_file": str(token)},
        "notify": [{"url": "json://127.0.0.1:9/x", "attach_clip": True}],
    }


def set_key(data: dict, path: tuple, value) -> None:
    for part in path[:-1]:
        data = data[part]
    data[path[-1]] = value


def build_what_run_builds(config, folder: Path) -> None:
    """What `monitord run` builds from the config's numbers, for real: the daemon (window queue,
    channels, scorer, inference and alert stages, clip writer, the MQTT and notification sinks),
    the event log and the ZeroMQ sockets with their options, each source's ring and window cutter,
    the MQTT client's connection settings, and every duration as a timed lock wait (what a timer
    cannot wait on, such as more than threading.TIMEOUT_MAX, raises there)."""
    from monitord.daemon import Daemon, ring_seconds
    from monitord.inference.build import model_inputs
    from monitord.inference.models.base import ModelBase
    from monitord.sources import open_source
    from monitord.windowing.tiling import WindowCutter

    class Shell(ModelBase):  # the model's config-driven settings, no weights
        model_id, labels = "shell", ("a",)

        def __init__(self, name, entry):
            super().__init__(name, entry)
            self.sample_rate = 16000 if entry.kind in ("yamnet", "emotion") else 48000

    models = {name: Shell(name, entry) for name, entry in config.models.items()}
    daemon = Daemon(config, models)
    daemon.publisher.start()
    try:
        daemon.clips.open()
        inputs = model_inputs(config, models)
        for source in config.sources:
            opened = open_source(source, ring_seconds(config), lambda *a: None)
            WindowCutter(source.id, opened.sample_rate, config.window, config.gate_for(source), inputs)
        for sink in daemon.sinks:
            if sink.name == "mqtt":
                sink._new_client().connect_async(config.publish.mqtt.host, config.publish.mqtt.port,
                                                 keepalive=config.publish.mqtt.keepalive_s)
    finally:
        daemon.publisher.close()
    lock = threading.Lock()
    for path, value in seconds_of(config):
        assert lock.acquire(timeout=value), path
        lock.release()


def seconds_of(config) -> list[tuple[str, float]]:
    """Every duration in the config, in seconds (keys ending in _s, _ms, _days)."""
    scale = {"_s": 1.0, "_ms": 1e-3, "_days": 86400.0}
    found = []
    for path, _ in numeric_keys(type(config), config.model_dump(mode="python")):
        value = config
        for part in path:
            value = value[part] if isinstance(value, (dict, tuple, list)) else getattr(value, part)
        unit = next((u for u in scale if str(path[-1]).endswith(u)), None)
        if unit is not None and value is not None:
            found.append((".".join(map(str, path)), value * scale[unit]))
    return found


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    from monitord.config import Config

    folder = tmp_path_factory.mktemp("hostile")
    base = hostile_base(folder)
    return folder, base, numeric_keys(Config, base)


def test_the_hostile_base_config_holds_every_section_and_runs(hostile):
    from monitord.config import Config

    folder, base, keys = hostile
    config = parse_config(yaml.safe_dump(base), folder)
    build_what_run_builds(config, folder)
    walked = {type(section) for section in _sections(config)}
    missing = {c for c in reachable_sections(Config) - walked if any(_is_number(f.annotation) for f in c.model_fields.values())}
    assert not missing, f"hostile_base has no {sorted(c.__name__ for c in missing)}: add one, so its numbers are drawn"
    assert len(keys) > 60, [".".join(map(str, k)) for k, _ in keys]


def _sections(model) -> list:
    found = [model]
    for name in type(model).model_fields:
        value = getattr(model, name)
        values = value.values() if isinstance(value, dict) else value if isinstance(value, tuple) else [value]
        found += [s for v in values if isinstance(v, BaseModel) for s in _sections(v)]
    return found


def _drawn_values(field) -> list:
    """The extremes, and the key's own bounds (a key at its limit is where sizes multiply)."""
    bounds = [getattr(m, attr) for m in field.metadata for attr in ("ge", "le", "gt", "lt") if hasattr(m, attr)]
    return [*EXTREMES, *bounds, *(b * 10 for b in bounds)]


def test_whatever_check_config_accepts_run_builds_or_it_names_the_key(hostile):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    folder, base, keys = hostile
    draw = st.lists(st.sampled_from(keys).flatmap(lambda kf: st.tuples(st.just(kf[0]), st.sampled_from(_drawn_values(kf[1])))),
                    min_size=1, max_size=3)

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(draw)
    def check(changes):
        data = copy.deepcopy(base)
        for path, value in changes:
            set_key(data, path, value)
        drawn = [".".join(map(str, path)) for path, _ in changes]
        try:
            config = parse_config(yaml.safe_dump(data), folder)
        except ConfigError as exc:
            lines = [str(p) for p in exc.problems]
            assert all(": " in line and "Traceback" not in line for line in lines), lines
            assert any(key in line for key in drawn for line in lines), (changes, lines)
            return
        build_what_run_builds(config, folder)

    check()


def test_a_list_of_unknown_names_aliased_a_thousand_times_is_refused_in_seconds(tmp_path):
    """24 KB of YAML: one list of 1,000 unknown class names as 1,000 groups. Each name got its own
    'did you mean' search (17 minutes, 70 MB of problems); now each once, and 100 problems listed."""
    import time

    members = ", ".join(f"zz{i}qq" for i in range(1000))
    text = ("sources: [{id: a, device: default}]\nmodels:\n  y:\n    kind: yamnet\n    groups:\n"
            f"      g0: &L [{members}]\n" + "".join(f"      g{i}: *L\n" for i in range(1, 1000)))
    began = time.process_time()
    with pytest.raises(ConfigError) as info:
        parse_config(text, tmp_path)
    problems = info.value.problems
    assert len(problems) == 101 and problems[-1].message == "and 999900 more problems (the first 100 are above)"
    assert problems[0].path == "models.y.groups.g0.0" and "'zz0qq' is not a class of model 'y'" in problems[0].message
    print(f"refused in {time.process_time() - began:.1f} s of CPU")


@pytest.mark.parametrize("key,value", [("sources.0.device", "yes"), ("sources.0.device", "off"), ("window.seconds", "true"),
                                       ("gate.vad_aggressiveness", "no")])
def test_yes_and_no_are_not_taken_for_numbers(tmp_path, key, value):
    """YAML reads yes/no/on/off as true/false; pydantic took those as 1 and 0 (`device: off` was device 0)."""
    section, *rest = key.split(".")
    text = {"sources": f"sources: [{{id: a, device: {value}}}]\n", "window": f"sources: [{{id: a, device: default}}]\nwindow: {{seconds: {value}}}\n",
            "gate": f"sources: [{{id: a, device: default}}]\ngate: {{vad_aggressiveness: {value}}}\n"}[section]
    with pytest.raises(ConfigError) as info:
        parse_config(text + "models: {yam: {kind: yamnet}}\n", tmp_path)
    assert [p.path for p in info.value.problems] == [key] and "YAML reads yes, no, on and off" in info.value.problems[0].message
    if section == "sources":  # quoted, it is a device name
        quoted = text.replace(f"device: {value}", f"device: '{value}'")
        assert parse_config(quoted + "models: {yam: {kind: yamnet}}\n", tmp_path).sources[0].device == value


@pytest.mark.parametrize("key,value", [("hop_s", "1e-9"), ("seconds", "1e-9")])
def test_a_window_or_hop_of_next_to_nothing_is_refused(tmp_path, key, value):
    """A 1e-9 s hop was one sample: 48,000 windows a second from one microphone."""
    with pytest.raises(ConfigError) as info:
        parse_config(f"sources: [{{id: a, device: default}}]\nmodels: {{yam: {{kind: yamnet}}}}\nwindow: {{{key}: {value}}}\n",
                     tmp_path)
    assert [p.path for p in info.value.problems] == [f"window.{key}"], info.value.problems
