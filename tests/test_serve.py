"""The inference stage on a real Ray Serve application: `monitord serve` starts a local Ray and two
replicas once for the module; capture nodes (in-process daemons on file sources) send to it.

Same events as local inference, windows of several nodes in one forward pass, a replica killed
mid-run (every window scored exactly once), strict parsing over HTTP, health checks, and a clean
exit on SIGTERM with no Ray process left behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, free_port, need, noise, silence, tone, wait_until, write_wav
from tests.serve_helpers import compare_runs, run_node, write_node
from tests.tiny_models import TRAIN_LABELS

pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")  # Ray's own models

RATE = 48000
REPLICA = "ServeReplica:monitord:MonitordInference"


@dataclass
class Cluster:
    url: str
    proc: subprocess.Popen
    log: Path
    config: Path
    up_s: float
    """From starting `monitord serve` to its URL line (Ray, Serve, two replicas loading the models)."""

    def ray_figures(self) -> str:
        found = re.search(r"Ray started in ([\d.]+) s, application up in ([\d.]+) s", self.log.read_text())
        return f"Ray {found.group(1)} s + application {found.group(2)} s" if found else "?"


def session_processes(session: int) -> list[int]:
    import psutil

    out = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == session and pid != session:
                out.append(pid)
        except OSError:
            continue
    return out


def replica_pids(session: int) -> list[int]:
    import psutil

    out = []
    for pid in session_processes(session):
        try:
            if REPLICA in " ".join(psutil.Process(pid).cmdline()):
                out.append(pid)
        except psutil.Error:
            continue
    return sorted(out)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_clap, tiny_emotion):
    need(importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.serve") is not None,
         "ray[serve] is not installed (pip install 'monitord[cluster]')")
    folder = tmp_path_factory.mktemp("serve")
    config = folder / "serve.yaml"
    config.write_text(f"""
models:
  clap: {{kind: clap, model: {tiny_clap}, labels: [{", ".join(TRAIN_LABELS)}], dtype: float32, batch_max: 8, batch_wait_ms: 50}}
  mood: {{kind: emotion, model: {tiny_emotion}, dtype: float32, batch_max: 8, batch_wait_ms: 50}}
serve: {{replicas: 2, canary_every_s: 3, health_check_period_s: 1, max_request_mb: 4}}
""")
    log = folder / "serve.log"
    began = time.monotonic()
    for attempt in range(3):
        # Ray's own processes take ports from the ephemeral range (and workers 10002-19999): the HTTP
        # port comes from between the two, and a bind lost to a race is tried again on another
        port = quiet_port()
        with log.open("w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "monitord", "serve", "-c", str(config), "--port", str(port)],
                                    cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        line = ""
        deadline = time.monotonic() + 240
        while not line and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 1.0)[0]:
                line = proc.stdout.readline().strip()
        if line or "Failed to bind" not in log.read_text() or attempt == 2:
            break
        stop_session(proc)
    try:
        assert line == f"http://127.0.0.1:{port}/monitord", f"no URL line ({line!r}); log:\n{log.read_text()[-3000:]}"
        yield Cluster(line, proc, log, config, time.monotonic() - began)
    finally:
        stop_session(proc)


def stop_session(proc: subprocess.Popen) -> None:
    """SIGTERM (`monitord serve` shuts the application and Ray down), then whatever Ray left of the session."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    for pid in session_processes(proc.pid):  # whatever Ray left of this session, by its id
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def quiet_port() -> int:
    """A free loopback port between Ray's worker ports and the ephemeral range."""
    import random
    import socket

    for _ in range(100):
        port = random.randint(20000, 29999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def _audio(tmp_path: Path, name: str, parts: list[np.ndarray]) -> str:
    write_wav(tmp_path / name, np.concatenate(parts), RATE)
    return name


def test_two_capture_nodes_get_the_same_events_as_local_inference(cluster, tiny_clap, tiny_emotion, tmp_path):
    a = _audio(tmp_path, "a.wav", [silence(1.0, RATE), tone(1000, 2.5, RATE, -12), silence(1.0, RATE), noise(2.0, RATE, -15), silence(1.0, RATE)])
    b = _audio(tmp_path, "b.wav", [noise(1.5, RATE, -20, seed=3), silence(1.0, RATE), tone(600, 3.0, RATE, -18), silence(1.5, RATE)])
    local_a = run_node(write_node(tmp_path, "a-local", tiny_clap, None, [a], emotion=tiny_emotion))
    local_b = run_node(write_node(tmp_path, "b-local", tiny_clap, None, [b], emotion=tiny_emotion))
    # node a sends both models; node b keeps its emotion model local
    configs = {"a": write_node(tmp_path, "a", tiny_clap, cluster.url, [a], remote=["clap", "mood"], emotion=tiny_emotion),
               "b": write_node(tmp_path, "b", tiny_clap, cluster.url, [b], remote=["clap"], emotion=tiny_emotion)}
    runs: dict = {}
    threads = [threading.Thread(target=lambda n=n: runs.__setitem__(n, run_node(configs[n]))) for n in configs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    compare_runs(local_a, runs["a"])
    compare_runs(local_b, runs["b"])
    assert {k[0] for k in runs["a"].scores} == {"clap", "mood"}  # the cascade went through the cluster too
    assert type(runs["b"].models["mood"]._model).__name__ == "EmotionClassifier"
    assert [e["rule"] for e in runs["a"].events if e["kind"] == "alert" and e["phase"] == "onset"] == ["tone", "noise"]
    sizes = runs["a"].models["clap"].stats.batch_sizes + runs["b"].models["clap"].stats.batch_sizes
    print(f"\nforward passes seen by the nodes (size: windows): {dict(sorted(sizes.items()))}; "
          f"serve up in {cluster.up_s:.1f} s ({cluster.ray_figures()})")


def test_windows_of_many_nodes_meet_in_one_forward_pass(cluster, tiny_clap):
    from monitord.config import ClapModelConfig, InferenceConfig
    from monitord.inference.models import build_model
    from monitord.inference import wire
    from monitord.inference.remote import RemoteModel

    config = ClapModelConfig(model=str(tiny_clap), labels=TRAIN_LABELS, dtype="float32", batch_max=2)
    target = InferenceConfig(url=cluster.url, models=("clap",), timeout_s=30)
    nodes = [RemoteModel("clap", config, target, node=f"node-{i}") for i in range(6)]
    windows = [[wire.make_window(wire.WindowMeta("rec", j * 24000, RATE, 2 * RATE, 0.0, 0.0),
                                 tone(300 + 200 * i, 2.0, RATE, -20) + noise(2.0, RATE, -30, seed=i * 2 + j), RATE)
                for j in range(2)] for i in range(len(nodes))]
    results: dict[int, list] = {}
    start = threading.Barrier(len(nodes))

    def send(i: int) -> None:
        start.wait()
        results[i] = nodes[i].score(windows[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(nodes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    sizes = sum((n.stats.batch_sizes for n in nodes), start=type(nodes[0].stats.batch_sizes)())
    assert max(sizes) > 2, f"every forward pass held one node's request only: {sizes}"  # each node sent 2 windows
    local = build_model("clap", config)
    for i, got in results.items():
        for g, e in zip(got, local.score(windows[i])):
            assert max(abs(g.probabilities[k] - p) for k, p in e.probabilities.items()) <= 1e-6


def test_a_replica_killed_mid_run_loses_no_window_and_scores_none_twice(cluster, tiny_clap, tmp_path):
    parts = [silence(0.5, RATE), tone(1000, 3.0, RATE, -12), silence(1.0, RATE), noise(3.0, RATE, -15), silence(1.0, RATE),
             tone(700, 3.0, RATE, -15), silence(1.0, RATE)]
    files = [_audio(tmp_path, "k1.wav", parts), _audio(tmp_path, "k2.wav", parts[::-1])]
    local = {n: run_node(write_node(tmp_path, f"{n}-local", tiny_clap, None, [f])) for n, f in zip("xy", files)}
    before = replica_pids(cluster.proc.pid)
    assert len(before) == 2
    recorders: list = []
    killed: list[int] = []

    def kill_when_busy() -> None:
        # Serve routes each request to either replica: on a loaded box both may sit on the one not
        # killed. Then (no retry within a few seconds) the other replica is killed too.
        deadline = time.monotonic() + 60
        for victim in before:
            while time.monotonic() < deadline and not finished.is_set():
                if len(recorders) == 2 and all(len(r.scored) >= 8 and r.busy.is_set() for r in recorders):
                    time.sleep(0.02)  # both nodes' requests are on replicas, waiting for their batches
                    os.kill(victim, signal.SIGKILL)  # a replica this test's cluster started
                    killed.append(victim)
                    break
                time.sleep(0.002)
            if wait_until(lambda: sum(r.transport.retries for r in recorders) >= 1, 5):
                return

    finished = threading.Event()
    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    runs: dict = {}
    configs = {n: write_node(tmp_path, n, tiny_clap, cluster.url, [f], remote=["clap"], timeout_s=60) for n, f in zip("xy", files)}
    threads = [threading.Thread(target=lambda n=n: runs.__setitem__(n, run_node(configs[n], lambda m: recorders.append(m["clap"]))))
               for n in configs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    finished.set()
    killer.join(10)
    assert killed, "the replica was never killed (the nodes finished first)"
    for n in "xy":
        compare_runs(local[n], runs[n])  # every window exactly once, the local events
    retries = sum(r.transport.retries for r in recorders)
    assert retries >= 1, "no request was retried: the kill hit no request"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and len(replica_pids(cluster.proc.pid)) < 2:
        time.sleep(0.5)
    after = replica_pids(cluster.proc.pid)
    assert len(after) == 2 and not set(killed) & set(after), "Serve did not bring the replica back"
    print(f"\nreplicas {killed} killed mid-run: {retries} retried requests; replicas now {after}")


def _post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/x-monitord", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {}
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_bad_bodies_are_clear_errors_over_serve(cluster, tiny_clap):
    from monitord.inference import wire

    status, answer = _post(f"{cluster.url}/v1/score", b"MNTD\x07\x00\x01\x00\x00\x00\x00\x00")
    assert status == 400 and "wire version 7 is not supported" in answer["error"]
    import http.client
    import urllib.parse

    where = urllib.parse.urlsplit(cluster.url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    conn.putrequest("POST", f"{where.path}/v1/score")
    conn.putheader("Content-Length", str(5 * 1024 * 1024))  # serve.max_request_mb: 4; refused before it is read
    conn.endheaders(b"MNTD")
    response = conn.getresponse()
    assert response.status == 413 and "max_request_mb" in json.loads(response.read())["error"]
    conn.close()
    meta = wire.WindowMeta("rec", 0, 16000, 32000, 0.0, 0.0)
    body = wire.encode_request(wire.ScoreRequest("r", "clap", "sha256:0", 16000, (meta,), (np.zeros(32000, np.float32),)))
    status, answer = _post(f"{cluster.url}/v1/score", body)
    assert status == 409 and "model 'clap'" in answer["error"]
    with urllib.request.urlopen(f"{cluster.url}/v1/models", timeout=30) as response:
        described = json.loads(response.read())
    assert described["models"]["clap"]["sample_rate"] == 48000 and described["models"]["mood"]["sample_rate"] == 16000


def test_a_node_with_other_labels_cannot_start_against_the_cluster(cluster, tiny_clap):
    from monitord.config import ClapModelConfig, InferenceConfig
    from monitord.inference.models.base import ModelUnavailable
    from monitord.inference.remote import RemoteModel

    config = ClapModelConfig(model=str(tiny_clap), labels=("tone", "noise", "speech", "siren"))
    with pytest.raises(ModelUnavailable, match=r"models\.clap: .*labels"):
        RemoteModel("clap", config, InferenceConfig(url=cluster.url, models=("clap",)))


def test_replicas_run_the_canary_when_idle(cluster):
    deadline = time.monotonic() + 30
    seen: dict[str, int] = {}
    while time.monotonic() < deadline and not any(seen.values()):
        with urllib.request.urlopen(f"{cluster.url}/v1/stats", timeout=30) as response:
            stats = json.loads(response.read())
        seen[stats["replica"]] = stats["canaries"]
        time.sleep(0.5)
    assert any(seen.values()), f"no replica ran a canary forward pass: {seen}"


def test_the_application_builder_for_rays_own_tooling(cluster):
    import yaml

    import monitord.serve

    app = monitord.serve.app({"config": str(cluster.config), "replicas": "3", "gpus_per_replica": "0.5"})
    deployment = app._bound_deployment
    assert deployment.name == "MonitordInference" and deployment.num_replicas == 3
    assert deployment.ray_actor_options["num_gpus"] == 0.5 and deployment.init_args == (str(cluster.config),)
    with pytest.raises(ValueError):
        monitord.serve.app({"config": str(cluster.config), "replica": 3})
    readme = (REPO / "docs" / "ray-cluster.md").read_text()
    block = re.search(r"```yaml\n(apiVersion: ray\.io/v1\nkind: RayService\n.*?)```", readme, re.S)
    assert block, "docs/ray-cluster.md: no RayService example"
    service = yaml.safe_load(block.group(1))
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    application = serve_config["applications"][0]
    assert application["import_path"] == "monitord.serve:app" and set(application["args"]) <= {"config", "replicas", "gpus_per_replica", "cpus_per_replica"}
    assert application["deployments"][0]["name"] == "MonitordInference"


def test_sigterm_takes_the_application_and_ray_down(cluster):
    """Last in the module: it stops the shared cluster."""
    session = cluster.proc.pid
    assert session_processes(session)
    began = time.monotonic()
    cluster.proc.send_signal(signal.SIGTERM)
    assert cluster.proc.wait(90) == 0
    took = time.monotonic() - began
    deadline = time.monotonic() + 15
    while session_processes(session) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not session_processes(session), "Ray processes outlived `monitord serve`"
    print(f"\nSIGTERM to exit 0 in {took:.1f} s, no Ray process left")
