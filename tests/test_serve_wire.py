"""Remote inference without Ray: the wire format, config checks, the service's HTTP API behind a
stdlib server, RemoteModel against it, retries and deadlines, the in-flight dispatcher.

The same service runs behind Ray Serve in tests/test_serve.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitord.config import ClapModelConfig, EmotionModelConfig, InferenceConfig, load_serve_config, parse_config
from monitord.inference.models.base import ModelUnavailable
from monitord.types import Scores
from monitord.inference import wire
from monitord.inference.remote import (Availability, InFlight, InferenceRefused, InferenceUnavailable,
                                   RemoteModel, RemoteModelError)
from monitord.serve.service import InferenceService
from tests.conftest import config_problems, free_port, need, noise, silence, tone, write_wav

RATE = 48000
LABELS = ("tone", "noise", "speech", "music")
TOKEN = "a-long-enough-shared-secret"


def window(source: str = "kitchen", start: int = 0, seconds: float = 2.0, rate: int = RATE, seed: int = 0, valid: int | None = None):
    samples = noise(seconds, rate, -20, seed) + tone(440 + 100 * seed, seconds, rate, -20)
    meta = wire.WindowMeta(source, start, rate, len(samples) if valid is None else valid, 1.7e9, 1.7e9 + seconds)
    return wire.make_window(meta, samples, rate)


def request_for(windows, model="clap", fingerprint="sha256:x", rate=RATE, pcm="float32", request_id="node:clap:1"):
    metas = tuple(wire.window_meta(w, rate, len(w.samples)) for w in windows)
    return wire.ScoreRequest(request_id, model, fingerprint, rate, metas, tuple(w.samples for w in windows), pcm)


# the wire format


def test_a_request_survives_the_wire_bit_for_bit():
    windows = [window(start=i * 24000, seed=i) for i in range(3)]
    body = wire.encode_request(request_for(windows))
    back = wire.decode_request(body, 1 << 26)
    assert [m.id for m in back.windows] == [("kitchen", 0), ("kitchen", 24000), ("kitchen", 48000)]
    for w, samples in zip(windows, back.audio):
        assert samples.dtype == np.float32 and np.array_equal(samples, w.samples)
    assert back.windows[0].wall_start == 1.7e9 and back.sample_rate == RATE and back.attempt == 1


def test_int16_pcm_is_half_the_bytes_and_close():
    windows = [window()]
    f32 = wire.encode_request(request_for(windows))
    i16 = wire.encode_request(request_for(windows, pcm="int16"))
    assert len(i16) < 0.51 * len(f32)
    back = wire.decode_request(i16, 1 << 26).audio[0]
    assert np.abs(back - windows[0].samples).max() <= 0.5 / 32767 + 1e-7


def test_a_response_carries_probabilities_exactly_and_embeddings_as_float32():
    probabilities = np.random.default_rng(0).random((2, 4)).astype(np.float32).astype(np.float64)
    embeddings = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    answer = wire.ScoreResponse("r", "clap", LABELS, (("a", 0), ("a", 1)), probabilities, embeddings, (8, 8), "rep")
    back = wire.decode_response(wire.encode_response(answer))
    assert np.array_equal(back.probabilities, probabilities) and np.array_equal(back.embeddings, embeddings)
    assert back.labels == LABELS and back.windows == (("a", 0), ("a", 1)) and back.batch_sizes == (8, 8)
    none = wire.decode_response(wire.encode_response(dataclasses.replace(answer, embeddings=None)))
    assert none.embeddings is None


def _frame(header: dict, payload: bytes = b"", version: int = 1, kind: int = 1, magic: bytes = b"MNTD") -> bytes:
    head = json.dumps(header).encode()
    return magic + version.to_bytes(2, "little") + kind.to_bytes(2, "little") + len(head).to_bytes(4, "little") + head + payload


def _valid_header(**changes) -> dict:
    w = {"source": "k", "start_index": 0, "source_rate": RATE, "samples": 4, "valid": 4, "wall_start": 1.0, "ready_at": 2.0}
    header = {"request_id": "id", "attempt": 1, "model": "clap", "fingerprint": "sha256:x", "pcm": "float32",
              "sample_rate": RATE, "windows": [w]}
    for key, value in changes.items():
        if key.startswith("w_"):
            w[key[2:]] = value
        else:
            header[key] = value
    return header


GOOD_PAYLOAD = np.zeros(4, dtype="<f4").tobytes()


@pytest.mark.parametrize("body, message", [
    (b"", "truncated body"),
    (b"MNTD\x01\x00", "truncated body"),
    (_frame(_valid_header(), GOOD_PAYLOAD, magic=b"PK\x03\x04"), "bad magic"),
    (_frame(_valid_header(), GOOD_PAYLOAD, version=2), "wire version 2 is not supported"),
    (_frame(_valid_header(), GOOD_PAYLOAD, kind=2), "frame kind 2"),
    (_frame(_valid_header(), GOOD_PAYLOAD)[:20], "truncated body: the header needs"),
    (_frame(_valid_header(), GOOD_PAYLOAD[:-1]), "payload truncated"),
    (_frame(_valid_header(), GOOD_PAYLOAD + b"\0"), "payload too long"),
    (b"MNTD\x01\x00\x01\x00\x03\x00\x00\x00[1]", "header must be a JSON object"),
    (b"MNTD\x01\x00\x01\x00\x02\x00\x00\x00\xff\xfe", "not UTF-8 JSON"),
    (b"MNTD\x01\x00\x01\x00\x00\x00\x20\x00", "header length"),
    (_frame(_valid_header(sample_rate=7), GOOD_PAYLOAD), "not a usable sample rate"),
    (_frame(_valid_header(pcm="float64"), GOOD_PAYLOAD), "header.pcm"),
    (_frame(_valid_header(w_samples=True), GOOD_PAYLOAD), "must be int, not bool"),
    (_frame(_valid_header(w_valid=5), GOOD_PAYLOAD), "valid = 5 is outside"),
    (_frame(_valid_header(w_source=""), GOOD_PAYLOAD), "source must be 1 to 64"),
    (_frame(_valid_header(w_samples=10**9), GOOD_PAYLOAD), "samples = 1000000000 is outside"),
    (_frame(_valid_header(windows=[]), GOOD_PAYLOAD), "1 to 4096 windows"),
    (_frame(_valid_header(model=None), GOOD_PAYLOAD), "header.model must be str"),
    (_frame(_valid_header(), np.array([0, 0, np.nan, 0], dtype="<f4").tobytes()), "NaN or Inf"),
    (_frame(_valid_header(), GOOD_PAYLOAD).replace(b'"wall_start": 1.0', b'"wall_start": NaN'), "numbers must be finite"),
])
def test_a_malformed_request_is_a_clear_400(body, message):
    with pytest.raises(wire.WireError) as info:
        wire.decode_request(body, 1 << 20)
    assert info.value.status == 400 and message in str(info.value)


def test_a_body_over_the_limit_is_413():
    with pytest.raises(wire.WireError) as info:
        wire.decode_request(_frame(_valid_header(), GOOD_PAYLOAD), 64)
    assert info.value.status == 413


VALID_BODY = wire.encode_request(request_for([window(seconds=0.05, rate=16000)], rate=16000))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_no_damage_to_a_body_crashes_the_parser(data):
    body = bytearray(VALID_BODY)
    for _ in range(data.draw(st.integers(1, 4))):
        choice = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if choice == "flip" and body:
            i = data.draw(st.integers(0, len(body) - 1))
            body[i] ^= data.draw(st.integers(1, 255))
        elif choice == "cut":
            body = body[: data.draw(st.integers(0, len(body)))]
        else:
            i = data.draw(st.integers(0, len(body)))
            body[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        wire.decode_request(bytes(body), 1 << 20)
    except wire.WireError as exc:
        assert exc.status in (400, 413)


def test_fingerprints_follow_what_changes_scores_and_ignore_the_rest():
    base = ClapModelConfig(model="/srv/models/clap-htsat-unfused", labels=LABELS)
    same = [
        base.model_copy(update={"batch_max": 32, "batch_wait_ms": 5.0, "device": "cuda", "dtype": "bfloat16"}),
        base.model_copy(update={"model": "laion/clap-htsat-unfused"}),  # paths differ between machines: compared by name
    ]
    other = [
        base.model_copy(update={"labels": ("tone", "noise", "speech")}),
        base.model_copy(update={"labels": ("noise", "tone", "speech", "music")}),
        base.model_copy(update={"prompt": "The sound of {label}."}),
        base.model_copy(update={"model": "/srv/models/clap-htsat-fused"}),
    ]
    assert all(wire.fingerprint(c) == wire.fingerprint(base) for c in same)
    assert len({wire.fingerprint(c) for c in [base, *other]}) == 1 + len(other)
    emotion = EmotionModelConfig(kind="emotion", model="/m/ser")
    assert wire.fingerprint(emotion) != wire.fingerprint(emotion.model_copy(update={"label_map": {"calm": "neutral"}}))
    assert wire.differences(wire.definition(base), wire.definition(other[2])) == ["prompt"]


# configuration


def _capture_config(tmp_path: Path, inference: str, models: str = "") -> str:
    write_wav(tmp_path / "in.wav", silence(1.0, RATE), RATE)
    return f"""
sources: [{{id: rec, file: in.wav}}]
models:
  clap: {{kind: clap, model: /m/clap, labels: [tone, noise]}}
  machine: {{kind: anomaly, embedding_model: clap, bank: b.npz}}
{models}
inference: {inference}
"""


def test_inference_section_problems_name_the_key(tmp_path):
    (tmp_path / "short.token").write_text("tooshort\n")
    problems = config_problems(_capture_config(tmp_path, "{url: 'http://gpu-head:8000/monitord', models: [clapp, machine, clap, clap], "
                                                          "timeout_s: 0, retries: 3}"), tmp_path)
    assert any(p.startswith("inference.timeout_s:") for p in problems)
    assert any(p.startswith("inference.retries: unknown key") for p in problems)
    problems = config_problems(_capture_config(tmp_path, "{url: 'http://gpu-head:8000/monitord', models: [clapp, machine, clap, clap]}"), tmp_path)
    assert "inference.models.0: no model named 'clapp'; did you mean 'clap'?" in " ".join(problems)
    assert any(p.startswith("inference.models.1: 'machine' is an anomaly model") for p in problems)
    assert any(p.startswith("inference.models.3: 'clap' is listed twice") for p in problems)
    assert any(p.startswith("inference.token_file: required: gpu-head is not a loopback address") for p in problems)
    problems = config_problems(_capture_config(tmp_path, "{url: 'ftp://x/monitord', models: [clap]}"), tmp_path)
    assert any(p.startswith("inference.url: 'ftp://x/monitord' is not an http(s) URL") for p in problems)
    problems = config_problems(_capture_config(tmp_path, "{url: 'http://10.0.0.5:8000/m', models: [clap], token_file: short.token}"), tmp_path)
    assert any(p.startswith("inference.token_file:") and "at least 16" in p for p in problems)
    problems = config_problems(_capture_config(tmp_path, "{url: 'http://10.0.0.5:8000/m', models: [clap], token_file: none.token}"), tmp_path)
    assert any(p.startswith("inference.token_file: file not found") for p in problems)


def test_a_loopback_url_needs_no_token_and_paths_resolve(tmp_path):
    (tmp_path / "b.npz").write_bytes(b"")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "serve.token").write_text(TOKEN)
    config = parse_config(_capture_config(tmp_path, "{url: 'http://127.0.0.1:8000/monitord', models: [clap]}"), tmp_path)
    assert config.inference.models == ("clap",) and config.inference.timeout_s == 5 and config.inference.max_in_flight == 4
    config = parse_config(_capture_config(tmp_path, "{url: 'https://gpu:8443/m', models: [clap], token_file: keys/serve.token}"), tmp_path)
    assert config.inference.token_file == str(tmp_path / "keys" / "serve.token")


def test_the_server_reads_only_models_and_serve(tmp_path):
    (tmp_path / "s.yaml").write_text("""
models:
  clap: {kind: clap, model: ./clap, labels: [tone, noise], batch_max: 16}
serve: {replicas: 2, canary_every_s: 5}
rules: [{whatever: the capture node's}]
""")
    served = load_serve_config(tmp_path / "s.yaml")
    assert served.serve.replicas == 2 and served.models["clap"].model == str(tmp_path / "clap")
    (tmp_path / "bad.yaml").write_text("models:\n  clap: {kind: clap, labels: [a, b]}\nserve: {replica: 2, token_file: t}\n")
    from monitord.config import ConfigError

    with pytest.raises(ConfigError) as info:
        load_serve_config(tmp_path / "bad.yaml")
    assert [str(p) for p in info.value.problems] == ["serve.replica: unknown key (did you mean 'replicas'?) (line 3)"]
    (tmp_path / "bad.yaml").write_text("models:\n  clap: {kind: clap, labels: [a, b]}\nserve: {token_file: t}\n")
    with pytest.raises(ConfigError) as info:
        load_serve_config(tmp_path / "bad.yaml")
    assert str(info.value.problems[0]).startswith("serve.token_file: file not found")


# the service behind a stdlib HTTP server


class StubModel:
    """Probabilities from the samples themselves, so a wrong window or order shows."""

    def __init__(self, name="clap", labels=LABELS, sample_rate=RATE, fail=None, embed=True):
        self.name, self.model_id, self.labels, self.sample_rate = name, "/m/clap", labels, sample_rate
        self.batch_max, self.batch_wait_ms, self.gated_by = 8, 10.0, None
        self.fail, self.embed, self.calls = fail, embed, []

    def score(self, windows):
        self.calls.append(len(windows))
        if self.fail is not None:
            raise self.fail
        out = []
        for w in windows:
            x = np.abs(w.at_rate(self.sample_rate)[:4].astype(np.float64)) + 1e-3
            p = x / x.sum()
            out.append(Scores(w, self.name, self.model_id, dict(zip(self.labels, map(float, p))),
                              np.array([w.start_index, w.valid], dtype=np.float32) if self.embed else None))
        return out

    def set_labels(self, labels, prompt):
        raise NotImplementedError


@contextmanager
def serving(service: InferenceService, prefix: str = "/monitord", tls: tuple[Path, Path] | None = None, port: int = 0):
    """The service behind ThreadingHTTPServer on a loopback port (``port``, or a free one; HTTPS
    with ``tls`` = (certificate, key)); yields the base URL. Leaving the block takes it down."""

    connections: set[socket.socket] = set()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            connections.add(self.connection)

        def finish(self) -> None:
            connections.discard(self.connection)
            super().finish()

        def _handle(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            reply = asyncio.run(service.handle(self.command, self.path.removeprefix(prefix), headers, body, self.client_address[0]))
            self.send_response(reply.status)
            for k, v in {"Content-Type": reply.content_type, "Content-Length": str(len(reply.body)), **reply.headers}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(reply.body)

        do_GET = do_POST = _handle

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}{prefix}"
    finally:
        server.shutdown()
        for conn in list(connections):  # keep-alive connections too: the server is gone, not just its listener
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()


def service_for(model, config, token=None, **kw) -> InferenceService:
    return InferenceService({model.name: model}, {model.name: config}, token, 1 << 26, kw.pop("canary_every_s", 30.0), "r1", **kw)


CLAP_CONFIG = ClapModelConfig(model="/m/clap", labels=LABELS)


def inference(url: str, token_file: Path | None = None, timeout_s: float = 3.0, **kw) -> InferenceConfig:
    return InferenceConfig(url=url, models=("clap",), token_file=None if token_file is None else str(token_file), timeout_s=timeout_s, **kw)


def test_remote_scores_are_the_models_own(tmp_path):
    model = StubModel()
    with serving(service_for(model, CLAP_CONFIG)) as url:
        remote = RemoteModel("clap", CLAP_CONFIG, inference(url))
        assert remote.verified and remote.sample_rate == RATE and remote.labels == LABELS
        windows = [window(start=i * 24000, seed=i, valid=90000 - i) for i in range(5)]
        got = remote.score(windows)
    expected = model.score(windows)
    assert [s.window for s in got] == windows  # the caller's own window objects, in order
    for g, e in zip(got, expected):
        assert g.probabilities == e.probabilities and list(g.probabilities) == list(LABELS)
        assert np.array_equal(g.embedding, e.embedding) and g.model == "clap" and g.model_id == "/m/clap"
    assert model.calls[-2] == 5 and remote.stats.batch_sizes == {5: 5} and remote.stats.requests == 1


def test_windows_are_sent_at_the_models_rate(tmp_path):
    model = StubModel(sample_rate=16000)
    with serving(service_for(model, CLAP_CONFIG)) as url:
        remote = RemoteModel("clap", CLAP_CONFIG, inference(url))
        assert remote.sample_rate == 16000
        w = window(valid=48000)  # 1 s of sound in a 2 s window at 48 kHz
        got = remote.score([w])[0]
    assert got.embedding[1] == 16000  # valid, converted to the model's rate
    assert got.probabilities == model.score([wire.make_window(wire.window_meta(w, 16000, 32000), w.at_rate(16000), 16000)])[0].probabilities


def test_the_token_is_required_and_compared(tmp_path):
    (tmp_path / "t").write_text(TOKEN + "\n")
    (tmp_path / "wrong").write_text("another-long-enough-secret")
    with serving(service_for(StubModel(), CLAP_CONFIG, token=TOKEN)) as url:
        assert RemoteModel("clap", CLAP_CONFIG, inference(url, tmp_path / "t")).score([window()])
        with pytest.raises(ModelUnavailable, match="HTTP 401"):
            RemoteModel("clap", CLAP_CONFIG, inference(url, tmp_path / "wrong"))
        remote = RemoteModel("clap", CLAP_CONFIG, inference(url), verify=False)
        with pytest.raises(InferenceRefused, match="401.*missing or wrong token") as info:
            remote.score([window()])
        assert info.value.status == 401


def test_a_token_file_emptied_after_the_config_check_is_refused_where_it_is_read(tmp_path):
    token_file = tmp_path / "t"
    token_file.write_text(TOKEN + "\n")
    assert wire.read_token(str(token_file)) == TOKEN
    token_file.write_text("\n")  # emptied between `check-config` and a replica (or capture node) starting
    with pytest.raises(wire.TokenFileError, match="holds 0 characters; a token needs at least 16"):
        wire.read_token(str(token_file))
    with pytest.raises(wire.TokenFileError, match="at least 16"):
        service_for(StubModel(), CLAP_CONFIG, token="")  # an empty secret would match "Authorization: Bearer "
    with pytest.raises(ModelUnavailable, match="inference.token_file.*holds 0 characters"):
        RemoteModel("clap", CLAP_CONFIG, inference("http://127.0.0.1:9/m", token_file))


def test_without_a_token_only_direct_loopback_clients_are_answered():
    service = service_for(StubModel(), CLAP_CONFIG)
    describe = lambda headers, client: asyncio.run(service.handle("GET", "/v1/models", headers, b"", client)).status  # noqa: E731
    assert describe({}, "127.0.0.1") == 200 and describe({}, "::1") == 200
    assert describe({}, "10.1.2.3") == 401
    assert describe({"x-forwarded-for": "10.1.2.3"}, "127.0.0.1") == 401  # a proxy on this host forwards strangers


def test_a_node_with_other_labels_is_refused_naming_the_model():
    served = StubModel()
    mine = CLAP_CONFIG.model_copy(update={"labels": ("tone", "noise", "speech", "siren")})
    with serving(service_for(served, CLAP_CONFIG)) as url:
        with pytest.raises(ModelUnavailable) as info:
            RemoteModel("clap", mine, inference(url))
        assert "models.clap" in str(info.value) and "labels" in str(info.value) and "siren" in str(info.value)
        remote = RemoteModel("clap", mine, inference(url), verify=False)  # the server was down at start
        with pytest.raises(InferenceRefused, match=r"HTTP 409.*model 'clap'.*differs") as refused:
            remote.score([window()])
        assert refused.value.status == 409
        assert served.calls == []  # nothing was scored with the wrong labels
        missing = RemoteModel("clap", CLAP_CONFIG, inference(url), verify=False)
        missing.name = "other"
        with pytest.raises(InferenceRefused, match="404.*'other' is not served here"):
            missing.score([window()])


def test_a_wrong_sample_rate_and_a_model_failure_are_told_apart():
    with serving(service_for(StubModel(sample_rate=16000), CLAP_CONFIG)) as url:
        remote = RemoteModel("clap", CLAP_CONFIG, inference(url), verify=False)  # assumes 48 kHz
        with pytest.raises(InferenceRefused, match="takes 16000 Hz audio; the request's is at 48000 Hz"):
            remote.score([window()])
    failing = StubModel(fail=RuntimeError("CUDA out of memory"))
    with serving(service_for(failing, CLAP_CONFIG)) as url:
        remote = RemoteModel("clap", CLAP_CONFIG, inference(url))
        with pytest.raises(RemoteModelError, match="CUDA out of memory"):
            remote.score([window()])
        assert failing.calls == [1] and remote.transport.retries == 0  # the model's failure is not retried


def test_a_retry_keeps_its_id_and_a_lost_answer_is_replayed_not_recomputed():
    model = StubModel()
    service = service_for(model, CLAP_CONFIG)
    remote = RemoteModel("clap", CLAP_CONFIG, inference("http://127.0.0.1:1/monitord"), verify=False)
    windows = [window(start=i * 24000, seed=i) for i in range(3)]
    metas = tuple(wire.window_meta(w, RATE, len(w.samples)) for w in windows)
    request = wire.ScoreRequest(remote.request_id(metas), "clap", remote.fingerprint, RATE, metas, tuple(w.samples for w in windows))
    assert request.request_id.startswith(f"{remote.node}:clap:kitchen@0+3:")
    first = asyncio.run(service.handle("POST", "/v1/score", {}, wire.encode_request(request), "127.0.0.1"))
    again = asyncio.run(service.handle("POST", "/v1/score", {}, wire.encode_request(dataclasses.replace(request, attempt=2)), "127.0.0.1"))
    assert first.status == again.status == 200 and model.calls == [3]
    a, b = wire.decode_response(first.body), wire.decode_response(again.body)
    assert b.replayed and not a.replayed and np.array_equal(a.probabilities, b.probabilities)
    assert service.stats.retried_requests == 1 and service.stats.replayed == 1
    other_node = dataclasses.replace(request, request_id=request.request_id.replace(remote.node, "elsewhere"))
    asyncio.run(service.handle("POST", "/v1/score", {}, wire.encode_request(other_node), "127.0.0.1"))
    assert model.calls == [3, 3]  # same source name and start on another node: scored, not replayed


def test_the_clusters_5xx_is_retried_with_the_same_id_until_it_answers():
    model = StubModel()
    service = service_for(model, CLAP_CONFIG)
    seen = []
    real = service.handle

    async def flaky(method, path, headers, body, client):
        if method == "POST":
            request = wire.decode_request(body, 1 << 26)
            seen.append((request.request_id, request.attempt))
            if len(seen) <= 2:
                from monitord.serve.service import error_reply

                return error_reply(503 if len(seen) == 1 else 500, "replica died")
        return await real(method, path, headers, body, client)

    service.handle = flaky
    with serving(service) as url:
        remote = RemoteModel("clap", CLAP_CONFIG, inference(url))
        assert len(remote.score([window()])) == 1
    assert [a for _, a in seen] == [1, 2, 3] and len({i for i, _ in seen}) == 1
    assert remote.transport.retries == 2 and model.calls == [1]


def test_https_with_a_private_ca(tmp_path):
    need(shutil.which("openssl") is not None, "openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    (tmp_path / "t").write_text(TOKEN)
    with serving(service_for(StubModel(), CLAP_CONFIG, token=TOKEN), tls=(cert, key)) as url:
        assert url.startswith("https://")
        remote = RemoteModel("clap", CLAP_CONFIG, inference(url, tmp_path / "t", ca_file=str(cert)))
        assert remote.verified and len(remote.score([window()])) == 1
        began = time.monotonic()
        with pytest.raises(InferenceRefused, match="certificate is not trusted.*inference.ca_file"):
            RemoteModel("clap", CLAP_CONFIG, inference(url, tmp_path / "t"), verify=False).score([window()])
        assert time.monotonic() - began < 1.0  # not retried until the timeout


def test_a_cluster_that_is_down_raises_within_the_timeout():
    port = free_port()  # nothing listens here
    remote = RemoteModel("clap", CLAP_CONFIG, inference(f"http://127.0.0.1:{port}/monitord", timeout_s=1.0))
    assert not remote.verified  # down at start: not an error
    began = time.monotonic()
    with pytest.raises(InferenceUnavailable, match=r"did not answer POST /v1/score within .* attempts.*Connection ?Refused"):
        remote.score([window()])
    assert time.monotonic() - began < 1.0 + 4.0  # about the timeout, not a hang (a busy machine adds some)
    assert remote.transport.retries >= 3  # it kept trying until the timeout rather than giving up at once


def test_a_server_that_never_answers_raises_within_the_timeout():
    with socket.socket() as listener:  # accepts connections (the kernel does), never replies
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        remote = RemoteModel("clap", CLAP_CONFIG, inference(f"http://127.0.0.1:{listener.getsockname()[1]}/m", timeout_s=1.0), verify=False)
        began = time.monotonic()
        with pytest.raises(InferenceUnavailable, match="timed out"):
            remote.score([window()])
        assert time.monotonic() - began < 1.6


def test_the_canary_runs_at_most_every_n_seconds_and_a_broken_model_fails_health():
    now = [0.0]
    model = StubModel()
    service = service_for(model, CLAP_CONFIG, canary_every_s=10.0, clock=lambda: now[0])
    asyncio.run(service.check_health())
    assert model.calls == []  # just started
    now[0] = 11.0
    asyncio.run(service.check_health())
    asyncio.run(service.check_health())
    assert model.calls == [1] and service.stats.canaries == 1
    now[0] = 15.0
    service.score_now("clap", [window()])  # real traffic proves health too
    now[0] = 24.0
    asyncio.run(service.check_health())
    assert model.calls == [1, 1]
    model.fail = RuntimeError("CUDA error: device-side assert triggered")
    with pytest.raises(RuntimeError):
        service.score_now("clap", [window()])
    with pytest.raises(RuntimeError, match="device-side assert"):
        asyncio.run(service.check_health())  # a failed batch: checked at once, and it raises, so Serve restarts the replica
    model.fail = None
    asyncio.run(service.check_health())  # recovered (a bad window, not a broken model)


def test_a_canary_with_nan_scores_is_unhealthy():
    class NanModel(StubModel):
        def score(self, windows):
            return [dataclasses.replace(s, probabilities={k: float("nan") for k in s.probabilities}) for s in super().score(windows)]

    now = [0.0]
    service = service_for(NanModel(), CLAP_CONFIG, canary_every_s=1.0, clock=lambda: now[0])
    now[0] = 2.0
    with pytest.raises(RuntimeError, match="non-finite"):
        asyncio.run(service.check_health())


def test_service_paths():
    service = service_for(StubModel(), CLAP_CONFIG)
    call = lambda m, p: asyncio.run(service.handle(m, p, {}, b"", "127.0.0.1"))  # noqa: E731
    assert call("GET", "/v1/nothing").status == 404 and call("GET", "/v1/score").status == 405
    described = json.loads(call("GET", "/v1/models").body)
    assert described["models"]["clap"]["fingerprint"] == wire.fingerprint(CLAP_CONFIG)
    assert described["models"]["clap"]["definition"]["labels"] == list(LABELS)
    assert json.loads(call("GET", "/v1/stats/").body)["requests"] == {"404": 1, "405": 1, "200": 1}


# the in-flight dispatcher and availability


def test_in_flight_keeps_n_in_the_air_and_answers_in_order():
    running, most = [0], [0]
    lock = threading.Lock()

    def call(i: int, delay: float):
        def run():
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(delay)
            with lock:
                running[0] -= 1
            if i == 5:
                raise InferenceUnavailable("down")
            return i * 10
        return run

    delays = [0.15, 0.01, 0.05, 0.01, 0.1, 0.01, 0.02, 0.01, 0.05, 0.0]
    flight: InFlight[int] = InFlight(3)
    outcomes = []
    for i, delay in enumerate(delays):
        assert flight.submit(call(i, delay), tag=i, timeout=5)
        assert flight.running <= 3
        outcomes += flight.ready()
    outcomes += flight.drain(timeout=5)
    flight.close()
    assert [o.tag for o in outcomes] == list(range(10))
    assert most[0] == 3
    assert [o.value for o in outcomes if o.error is None] == [i * 10 for i in range(10) if i != 5]
    assert isinstance(outcomes[5].error, InferenceUnavailable)
    with pytest.raises(InferenceUnavailable):
        outcomes[5].result()


def test_in_flight_submit_waits_for_a_slot_and_next_times_out():
    release = threading.Event()
    flight: InFlight[int] = InFlight(1)
    assert flight.submit(lambda: release.wait(5) and 1, tag="a")
    assert flight.full and not flight.submit(lambda: 2, tag="b", timeout=0.1)
    assert flight.next(timeout=0.05) is None and flight.ready() == []
    release.set()
    assert flight.submit(lambda: 2, tag="b", timeout=5)  # the first finished: its slot is free, uncollected
    assert [o.value for o in flight.drain(5)] == [1, 2] and flight.next(0) is None and len(flight) == 0
    flight.close()


def test_availability_reports_each_transition_once():
    now = [0.0]
    a = Availability(clock=lambda: now[0])
    assert a.succeeded() is None and a.up
    assert a.failed(InferenceUnavailable("x")) is True and a.failed("again") is False and not a.up
    now[0] = 7.5
    assert a.succeeded() == 7.5 and a.succeeded() is None and a.up


# a whole run, local against remote (the same, behind Ray Serve, is in test_serve.py)


def test_a_file_run_with_remote_inference_gives_the_local_events(tiny_clap, tmp_path):
    from tests.serve_helpers import compare_runs, run_node, write_node

    audio = np.concatenate([silence(1.0, RATE), tone(1000, 2.0, RATE, -12), silence(1.0, RATE), noise(2.0, RATE, -15),
                            silence(1.5, RATE)])
    write_wav(tmp_path / "in.wav", audio, RATE)
    config = write_node(tmp_path, "node", tiny_clap, None, ["in.wav"])
    local = run_node(config)
    from monitord.config import load_config
    from monitord.inference.models import build_model

    served = load_config(config).models
    models = {name: build_model(name, m) for name, m in served.items()}
    service = InferenceService(models, dict(served), None, 1 << 26, 30.0, "r1")
    with serving(service) as url:
        remote = run_node(write_node(tmp_path, "node-remote", tiny_clap, url, ["in.wav"], remote=["clap"]))
    compare_runs(local, remote)
    assert any(e["kind"] == "alert" for e in local.events)


def test_monitord_serve_refuses_bad_configs_and_an_open_address_without_a_token(tmp_path, capsys):
    from monitord.cli import main

    (tmp_path / "s.yaml").write_text("models:\n  clap: {kind: clap, model: /m/clap, labels: [a, b]}\n")
    assert main(["serve", "-c", str(tmp_path / "s.yaml"), "--host", "0.0.0.0"]) == 2
    assert "serve.token_file: required to serve on 0.0.0.0" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("models:\n  clap: {kind: clap, model: /m/clap, labels: [a, a]}\n")
    assert main(["serve", "-c", str(tmp_path / "bad.yaml")]) == 2
    assert "models.clap.labels: duplicate labels: a (line 2)" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("models:\n  clap: {kind: clap, model: /m/clap, labels: [a, b]}\nserve: {ssl_certfile: c.pem}\n")
    assert main(["serve", "-c", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "serve.ssl_keyfile: give both ssl_certfile and ssl_keyfile, or neither (line 3)" in err
    assert "serve.ssl_certfile: file not found" in err


def test_a_capture_node_that_only_sends_imports_no_ray_and_no_torch():
    code = ("import sys; from monitord.inference.build import load_models; import monitord.inference.remote, monitord.serve; "
            "print(sorted(m for m in ('ray', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
