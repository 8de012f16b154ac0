"""Shared fixtures: tiny offline models, test audio, the PulseAudio null sink, free ports."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
SOUND_SERVER = REPO / "tests" / "sound-server.sh"
SHARED = REPO.parent / "shared"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# a config that leaves its event log out writes it to the state directory: the tests' own, not the home's,
# and each pytest-xdist worker's own (a worker inherits the controller's environment)
if os.environ.get("PYTEST_XDIST_WORKER") or "XDG_STATE_HOME" not in os.environ:
    os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix=f"monitord-test-state-{os.environ.get('PYTEST_XDIST_WORKER', '')}")


def in_ci() -> bool:
    """Whether this run is CI's, where everything the tests need must be present (read at each call)."""
    return bool(os.environ.get("CI"))


def time_scale() -> float:
    """How much longer than on an idle box a bound on real time may take here: the factor in
    ``MONITORD_TEST_TIME_SCALE`` (1 by default), times the machine's load per core where it is
    above 1 (a suite run beside other work). Only bounds that say "it did not hang" scale; none of
    them is a speed target (those are in the benchmarks)."""
    try:
        factor = float(os.environ.get("MONITORD_TEST_TIME_SCALE", "1"))
    except ValueError:
        factor = 1.0
    return max(factor, 0.1) * max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))


def need(condition: bool, reason: str) -> None:
    """Skip with a reason where the machine lacks something; in CI, where it must be there, fail."""
    if not condition:
        if in_ci():
            pytest.fail(f"CI must provide this: {reason}")
        pytest.skip(reason)


@contextlib.contextmanager
def headless_chromium():
    """Debian's Chromium, headless, driven by Playwright (a skip saying what is missing; in CI, a
    failure), closed afterwards. The flags keep it off the network this machine does not have."""
    need(shutil.which("chromium") is not None, "chromium is not installed (Debian package chromium)")
    try:
        import playwright.sync_api as playwright
    except ImportError:
        playwright = None
    need(playwright is not None, "playwright is not installed (pip install playwright)")
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        try:
            yield browser
        finally:
            browser.close()


def require(module: str, install: str):
    """``module``, imported; where it is not installed, a skip saying how to install it (in CI, a failure)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        need(False, f"{module} is not installed ({install}): {exc}")


def wait_until(predicate, timeout: float) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (its last answer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def tone(freq: float, seconds: float, rate: int, dbfs: float = -12.0) -> np.ndarray:
    """A sine whose RMS is ``dbfs``."""
    t = np.arange(int(round(seconds * rate))) / rate
    return (10 ** (dbfs / 20) * np.sqrt(2) * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def noise(seconds: float, rate: int, dbfs: float, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(int(round(seconds * rate)))
    return (10 ** (dbfs / 20) * x / x.std()).astype(np.float32)


def silence(seconds: float, rate: int) -> np.ndarray:
    return np.zeros(int(round(seconds * rate)), dtype=np.float32)


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    sf.write(str(path), samples, rate, subtype="FLOAT" if samples.dtype == np.float32 else "PCM_16")
    return path


def file_windows(path: Path, gate, rates=(48000,), hop_s: float = 0.5, ring_seconds: float = 10.0, realtime: bool = False):
    """Every window of a file, through the daemon's own file source, ring buffer and windowing
    stage (one model per rate, named "m<rate>"): (sample rate, windows, statuses)."""
    import time

    from monitord.config import SourceConfig, WindowConfig
    from monitord.windowing.queue import WindowQueue
    from monitord.sources.file import FileSource
    from monitord.types import Window
    from monitord.windowing.stage import WindowingStage
    from monitord.windowing.tiling import ModelInput, WindowCutter

    statuses: list[tuple[str, str]] = []
    source = FileSource(SourceConfig(id="f", file=str(path), realtime=realtime), ring_seconds,
                        on_status=lambda source_id, status, detail: statuses.append((status, detail)))
    cutter = WindowCutter("f", source.sample_rate, WindowConfig(seconds=2.0, hop_s=hop_s), gate,
                          {f"m{rate}": ModelInput(rate) for rate in rates})
    queue = WindowQueue(1 << 20)
    windowing = WindowingStage(source.ring, cutter, queue, live=False)
    windowing.start()
    source.start()
    deadline = time.monotonic() + 60
    while not windowing.finished and time.monotonic() < deadline:
        time.sleep(0.01)
    assert windowing.finished, f"windowing did not finish: {windowing.state} {windowing.error!r}"
    source.join(5)
    windows = [w for w in queue.get_batch(1 << 20, 0.0, 0.0) if isinstance(w, Window)]
    return source.sample_rate, windows, statuses


def config_problems(text: str, base_dir: Path) -> list[str]:
    """The problems a config text is refused with (fails if it is accepted)."""
    from monitord.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir)
    return [str(p) for p in info.value.problems]


PORTS_FROM, PORTS_PER_WORKER, PORT_BLOCKS = 20000, 1500, 8
"""free_port's ports: below Linux's ephemeral range (32768 up), one block per pytest-xdist worker."""
_next_port = itertools.count(os.getpid() % PORTS_PER_WORKER)


def free_port() -> int:
    """A loopback port nothing is bound to now. Not one the kernel picked (bind to 0): that comes from
    the ephemeral range, where the kernel also picks the local port of every outgoing connection (any
    test's HTTP, ZeroMQ, Ray or PulseAudio client), so it could be taken before the test bound it (CI
    under load: "Address already in use"). Below that range, in this worker's own block, only this
    process and the tests of this worker hand ports out."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) + 1 if worker[2:].isdigit() else 0
    block = PORTS_FROM + (index % PORT_BLOCKS) * PORTS_PER_WORKER
    for _ in range(PORTS_PER_WORKER):
        port = block + next(_next_port) % PORTS_PER_WORKER
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # bound by something else, or in TIME_WAIT: the next one
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * rate / len(samples))


def rms_dbfs(samples: np.ndarray) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(np.square(samples, dtype=np.float64))) + 1e-12))


TRAINED_CACHE = Path(os.environ.get("MONITORD_TEST_CACHE") or Path.home() / ".cache" / "monitord-tests")
"""Where trained tiny models are kept between runs: each is a function of tests/tiny_models.py and
of the library versions, so it is trained again when either changes (the folder name says which)."""


def trained_once(name: str, train: Callable[[Path], Path]) -> Path:
    """``train(folder)``'s checkpoint, trained by the first test process that needs it and kept
    across runs (a lock keeps pytest-xdist workers from training it twice); read-only by convention:
    take a copy (``copied_model``) before writing beside it."""
    import hashlib
    from importlib.metadata import version

    from filelock import FileLock

    key = hashlib.sha256((REPO / "tests" / "tiny_models.py").read_bytes())
    for package in ("torch", "transformers", "tokenizers", "numpy"):
        key.update(f"{package}={version(package)}".encode())
    folder = TRAINED_CACHE / f"{name}-{key.hexdigest()[:16]}"
    TRAINED_CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{folder}.lock"):
        if not (folder / ".complete").exists():
            shutil.rmtree(folder, ignore_errors=True)
            train(folder)
            (folder / ".complete").touch()
    return folder


def copied_model(trained: Path, folder: Path) -> Path:
    """A test's own copy of a kept checkpoint (tests write engine caches beside it)."""
    shutil.copytree(trained, folder, ignore=shutil.ignore_patterns(".complete", ".monitord-engine"))
    return folder


@pytest.fixture(scope="session")
def tiny_clap(tmp_path_factory) -> Path:
    """A tiny CLAP checkpoint, trained for a few seconds to tell tones from noise, saved to disk
    (trained once and kept: ``trained_once``); each test process gets its own copy."""
    from tests.tiny_models import build_clap, train_clap

    trained = trained_once("tiny-clap", lambda folder: train_clap(build_clap(folder)))
    return copied_model(trained, tmp_path_factory.mktemp("models") / "clap")


@pytest.fixture(scope="session")
def random_clap(tmp_path_factory) -> Path:
    """A tiny CLAP checkpoint with random weights (for exact-equality checks)."""
    from tests.tiny_models import build_clap

    return build_clap(tmp_path_factory.mktemp("models") / "clap-random")


@pytest.fixture(scope="session")
def sound_server() -> Iterator[dict[str, str]]:
    """The PulseAudio null sink 'vsink' (its monitor is the default capture source); yields env.

    The server is this session's own (a private runtime dir: nobody else's server is reused, or
    stopped) and is stopped at the end of the session with its keep-alive reader."""
    need(shutil.which("pulseaudio") is not None and shutil.which("paplay") is not None,
         "PulseAudio is not installed (tests/sound-server.sh install)")
    runtime_dir = tempfile.mkdtemp(prefix="monitord-sound-")  # short: the server's socket path must fit 108 bytes
    env = {**os.environ, "XDG_RUNTIME_DIR": runtime_dir, "MONITORD_SOUND_OWNER": str(os.getpid())}
    previous = os.environ.get("XDG_RUNTIME_DIR")
    try:
        out = subprocess.run(["bash", str(SOUND_SERVER), "start"], env=env, capture_output=True, text=True, timeout=60)
        need(out.returncode == 0, f"the sound server did not start: {out.stderr.strip()}")
        os.environ["XDG_RUNTIME_DIR"] = runtime_dir
        os.environ["MONITORD_SOUND_OWNER"] = env["MONITORD_SOUND_OWNER"]  # a restart in a test leaves a watcher too
        import sounddevice as sd

        sd._terminate()  # PortAudio lists devices as they were when it was initialised
        sd._initialize()
        yield {"XDG_RUNTIME_DIR": runtime_dir}
    finally:
        # `restart` (tests/test_faults.py) rewrites the pid files, so this stops whatever runs now
        subprocess.run(["bash", str(SOUND_SERVER), "stop"], env=env, capture_output=True, timeout=60)
        os.environ.pop("MONITORD_SOUND_OWNER", None)
        if previous is None:
            os.environ.pop("XDG_RUNTIME_DIR", None)
        else:
            os.environ["XDG_RUNTIME_DIR"] = previous
        shutil.rmtree(runtime_dir, ignore_errors=True)


def play(path: Path, env: dict[str, str]) -> subprocess.Popen:
    """Play a file into the null sink, as a speaker would into a microphone."""
    return subprocess.Popen(["paplay", "--device=vsink", str(path)], env={**os.environ, **env})


def monitord_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "monitord", *args]


YAMNET = SHARED / "models" / "yamnet" / "yamnet.tflite"
AUDIO = SHARED / "audio"


def shared_path(path: Path) -> Path:
    """A file from ../shared (real recordings, YAMNet); where it is absent the test skips, saying so,
    or fails in CI, which must have it."""
    need(path.exists(), f"{path} is absent: these tests use the real material in ../shared")
    return path


@pytest.fixture(scope="session")
def tiny_emotion(tmp_path_factory) -> Path:
    from tests.tiny_models import build_emotion

    return build_emotion(tmp_path_factory.mktemp("models") / "emotion")


ONE_AT_A_TIME = {"test_serve.py": "ray", "test_serve_hostile.py": "ray", "test_bench.py": "bench", "test_engines.py": "bench"}
"""Files whose tests must not run at the same time: those that start a local Ray cluster with Serve,
and those that run `monitord bench` (two benchmarks would measure each other)."""


@pytest.fixture(scope="module", autouse=True)
def one_file_of_a_group_at_a_time(request, tmp_path_factory):
    """A file of ONE_AT_A_TIME holds its group's lock while its tests run (pytest-xdist workers share
    the lock folder, their base temporary folders' parent): a worker with the other file waits."""
    group = ONE_AT_A_TIME.get(request.path.name)
    if group is None:
        yield
        return
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    with FileLock(str(root / f"{group}.lock"), timeout=1800 * time_scale()):
        yield


def pytest_configure(config):
    """Every test's own time limit (pytest-timeout: 300 s, or a test's ``timeout`` mark) times the
    time scale (``MONITORD_TEST_TIME_SCALE``, the load per core): a loaded machine is slower, not broken."""
    scale = time_scale()
    if scale > 1 and getattr(config.option, "timeout", None):
        config.option.timeout = float(config.option.timeout) * scale


def pytest_collection_modifyitems(config, items):
    """A test's ``timeout`` mark times the time scale too."""
    scale = time_scale()
    for item in items:
        mark = item.get_closest_marker("timeout")
        if mark is not None and mark.args and scale > 1:
            item.add_marker(pytest.mark.timeout(float(mark.args[0]) * scale), append=False)
