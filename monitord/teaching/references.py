"""Reference positives: recordings of a rule's own sound that "not this" can never teach it away from.

A rule's ``not_like.reference`` names them: ``glass`` (real glass breaks shipped with monitord,
CC0 / CC BY, see ``references/NOTICE.md``), ``smoke-alarm`` (the temporal-three pattern of ISO 8201,
synthesised here), or a folder of your own recordings of the sound. Each recording is heard as a
rule would hear it in a room: dry, reverberant (RT60 0.5 s), and under steady noise at 10 and 0 dB
SNR, cut into the config's windows and embedded by the rule's embedding model once, at start.

A window is suppressed for a rule only when it is nearer to a taught false alarm than to every
reference (and every "yes, this"): ``suppress.judge``. A rule with no reference keeps only its
taught "yes, this" examples as a guard, and its margin should stay small (README: teaching).
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from monitord.audio import pink_noise, read_mono, reverb
from monitord.config import BUILTIN_REFERENCES, Config, GateConfig

log = logging.getLogger(__name__)

FOLDER = Path(__file__).with_name("references")
SMOKE_ALARM = "smoke-alarm"
BUILTIN = BUILTIN_REFERENCES
RATE = 16000
ROOM_RT60_S = 0.5
NOISE_SNR_DB = (10.0, 0.0)
SEED = 20261207
CACHE_FORMAT = "monitord.references/1"
MAX_WINDOWS = 2000
"""A folder of one's own recordings gives at most this many reference windows (evenly spread)."""
MAX_CACHE_MEMBER_BYTES = MAX_WINDOWS * 8192 * 4 + (1 << 20)
"""A kept file's arrays inflate to at most this (MAX_WINDOWS rows of up to 8192 floats): past it, not read."""


class ReferenceUnreadable(Exception):
    """A reference that cannot be read; the message says which and why."""


@dataclass(frozen=True)
class Recording:
    name: str
    """Which recording (a file name): the benchmark leaves one out at a time by it."""
    samples: np.ndarray
    rate: int


@dataclass(frozen=True, eq=False)
class References:
    """A rule's reference windows, embedded: (P, D) L2-normalised rows and the recording of each."""

    name: str
    embeddings: np.ndarray
    recordings: np.ndarray = field(default_factory=lambda: np.zeros(0, str))

    def __len__(self) -> int:
        return len(self.embeddings)

    def without(self, recording: str) -> "References":
        """These references less one recording's windows (measuring recall on that recording)."""
        keep = self.recordings != recording
        return References(self.name, self.embeddings[keep], self.recordings[keep])


def smoke_alarm_recordings(rate: int = RATE) -> list[Recording]:
    """The temporal-three pattern (0.5 s on, 0.5 s off, three times, then 1.5 s off), twice: a piezo
    horn's near-square tone at 3.1 and 3.4 kHz, and the 520 Hz square wave of low-frequency alarms."""
    t = np.arange(int(6.0 * rate)) / rate
    on = (t % 4.0 < 3.0) & ((t % 1.0) < 0.5)
    out = []
    for hz in (3100.0, 3400.0, 520.0):
        tone = np.sign(np.sin(2 * np.pi * hz * t)) if hz < 1000 else np.tanh(3 * np.sin(2 * np.pi * hz * t))
        out.append(Recording(f"t3-{hz:g}hz", (0.3 * tone * on).astype(np.float32), rate))
    return out


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".caf", ".w64")
"""What is taken from a folder of one's own: its audio files (a NOTICE or README beside them is not one)."""


def audio_in(where: Path) -> list[Path]:
    """The audio files a reference path names: the file, or the audio files under the folder."""
    if not where.is_dir():
        return [where] if where.exists() else []
    return sorted(p for p in where.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in AUDIO_SUFFIXES)


def recordings(reference: str) -> list[Recording]:
    """The recordings a reference names: a built-in set, or a folder (or file) of your own."""
    return [load() for load in _loaders(reference)]


def _loaders(reference: str) -> list[Callable[[], Recording]]:
    """One loader per recording a reference names (read when called: one recording in memory at a time)."""
    if reference == SMOKE_ALARM:
        return [lambda r=r: r for r in smoke_alarm_recordings()]
    where = FOLDER / reference if reference in BUILTIN else Path(reference)
    files = audio_in(where)
    if not files:
        raise ReferenceUnreadable(f"reference {reference}: {where} holds no recordings (a built-in one is one of "
                             f"{', '.join(BUILTIN)}; else a folder of recordings of the rule's sound)")

    def load(path: Path) -> Recording:
        try:
            samples, rate = read_mono(path)
        except Exception as exc:  # noqa: BLE001 - whatever a bad file raises: named, with the reason
            raise ReferenceUnreadable(f"reference {reference}: cannot read {path}: {exc}") from None
        return Recording(path.name, samples, rate)

    return [lambda path=path: load(path) for path in files]


def heard_in_rooms(recording: Recording, window_s: float, rng: np.random.Generator) -> list[np.ndarray]:
    """The recording as a rule hears it: dry, reverberant, and under steady noise, each padded to at
    least one window (a short crash sits in the middle of it)."""
    x = recording.samples.astype(np.float32)
    n = max(len(x), int(round(window_s * recording.rate)))
    pad = (n - len(x)) // 2
    dry = np.zeros(n, np.float32)
    dry[pad : pad + len(x)] = x
    wet = reverb(dry, ROOM_RT60_S, rng, recording.rate)
    out = [dry, wet]
    level = float(np.sqrt(np.mean(x**2))) if len(x) else 0.0
    for snr in NOISE_SNR_DB:
        bed = pink_noise(n, rng) * level * 10 ** (-snr / 20)
        out += [dry + bed, wet + bed]
    return out


def windows(config: Config, embedder, reference: str) -> tuple[list, list[str]]:
    """The reference's windows, cut by the config's own windowing for ``embedder`` (every window
    scored: the gate is not asked), and the recording each came from."""
    from monitord.teaching.teach import cutter_for
    from monitord.windowing.tiling import window_starts

    loaders = _loaders(reference)
    rooms = 2 + 2 * len(NOISE_SNR_DB)  # heard_in_rooms: dry, wet, and each under each noise level

    def cutter_of(recording: Recording):
        return cutter_for(config, f"reference:{reference}", recording.rate, embedder, GateConfig(mode="always"))

    # first how many windows there are, then each recording again, keeping only the MAX_WINDOWS evenly
    # spread ones: memory holds one recording (in its rooms) and the windows kept, whatever the folder holds
    total = 0
    for load in loaders:
        recording = load()
        n = max(len(recording.samples), int(round(config.window.seconds * recording.rate)))  # as heard_in_rooms pads
        cutter = cutter_of(recording)
        total += rooms * len(window_starts(n, cutter.length, cutter.hop))
    keep = None if total <= MAX_WINDOWS else \
        set(np.unique(np.linspace(0, total - 1, MAX_WINDOWS).round().astype(int)).tolist())
    rng = np.random.default_rng(SEED)
    cut, names, i = [], [], 0
    for load in loaders:
        recording = load()
        cutter = cutter_of(recording)
        for audio in heard_in_rooms(recording, config.window.seconds, rng):
            for start in window_starts(len(audio), cutter.length, cutter.hop):
                if keep is None or i in keep:
                    cut.append(cutter.cut(audio[start : start + cutter.length], start, 0.0, 0.0))
                    names.append(recording.name)
                i += 1
    if i != total:  # heard_in_rooms changed without this count: a bug, said plainly
        raise RuntimeError(f"reference {reference}: {i} windows cut, {total} counted")
    return cut, names


def embed_reference(config: Config, embedder, reference: str, embed_with: Callable | None = None) -> References:
    """``embed_with(embedder, cuts)``: how the windows are embedded (``teach.embed`` here and now by default)."""
    from monitord.teaching.teach import Cut, embed

    cut, names = windows(config, embedder, reference)
    embeddings = (embed_with or embed)(embedder, [Cut(w, n) for w, n in zip(cut, names)])
    embeddings /= np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    return References(reference, embeddings.astype(np.float32), np.asarray(names, dtype=str))


def cache_key(config: Config, embedder, reference: str) -> str:
    """What the embedded references depend on: the model, the windowing, the recordings."""
    import hashlib

    parts = [CACHE_FORMAT, str(embedder.model_id), str(embedder.sample_rate), f"{config.window.seconds:g}",
             f"{config.window.hop_s:g}", reference]
    if reference not in BUILTIN:
        where = Path(reference)
        for p in audio_in(where):
            try:
                st = p.stat()
            except OSError:  # gone since it was listed: it changes the key all the same
                parts.append(f"{p}:gone")
                continue
            parts.append(f"{p}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def cached(config: Config, embedder, reference: str, folder: Path) -> References | None:
    """The references embedded earlier for this model, windowing and recordings (None: not yet)."""
    path = folder / f"{cache_key(config, embedder, reference)}.npz"
    try:
        with np.load(path, allow_pickle=False) as z:
            if any(info.file_size > MAX_CACHE_MEMBER_BYTES for info in z.zip.infolist()):
                return None  # no references of ours: not inflated (a state directory written by someone else)
            embeddings, names = z["embeddings"].astype(np.float32), z["recordings"].astype(str)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if embeddings.ndim != 2 or not len(embeddings) or len(embeddings) > MAX_WINDOWS or len(embeddings) != len(names) or \
            not np.all(np.isfinite(embeddings)) or \
            not _unit_rows(embeddings):  # not what embed_reference writes
        return None
    return References(reference, embeddings, names)


def _unit_rows(embeddings: np.ndarray) -> bool:
    """Rows of norm 1 (or 0: a window the model embeds as nothing), at least one of norm 1."""
    norms = np.linalg.norm(embeddings, axis=1)
    unit = np.abs(norms - 1.0) <= 1e-3
    return bool(unit.any() and np.all(unit | (norms == 0.0)))


def embed_and_keep(config: Config, embedder, reference: str, folder: Path, embed_with: Callable | None = None) -> References:
    """Embed a reference and keep it in ``folder`` (written atomically) for the next start."""
    import os
    import threading

    found = embed_reference(config, embedder, reference, embed_with)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{cache_key(config, embedder, reference)}.npz"
        tmp = folder / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, embeddings=found.embeddings, recordings=found.recordings)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only state directory: embedded again at the next start
        log.warning("references %s: not kept in %s (%s)", reference, folder, exc)
    return found


@dataclass(frozen=True)
class Needed:
    rule_id: str
    model: str
    reference: str


def kept_folder() -> Path:
    """Where embedded references are kept between runs: ``references/`` in the state directory
    (the daemon, ``classify --rules`` and ``eval`` share it)."""
    from monitord.config import state_dir

    return state_dir() / "references"


def needed(config: Config, embedder_of: Callable[[str], object | None]) -> list[Needed]:
    """The references the config's rules name whose embedding model is loaded here. A folder of
    one's own that holds no recordings is a ReferenceUnreadable naming the rule."""
    from monitord.teaching.teach import embedding_model_for

    out = []
    for rule in config.rules:
        reference = rule.not_like.reference if rule.not_like is not None else None
        if reference is None:
            continue
        if reference not in BUILTIN:
            where = Path(reference)
            if not audio_in(where):
                raise ReferenceUnreadable(f"rules.{rule.id}.not_like.reference: {where} holds no recordings "
                                          f"(audio files: {', '.join(AUDIO_SUFFIXES)})")
        name = embedding_model_for(config, Path(rule.not_like.bank), rule.id, None)
        embedder = embedder_of(name)
        if embedder is None or getattr(embedder, "device", "cpu") == "remote":
            # said once at start, with what it turns off (the daemon's model_unavailable status): not at each call
            log.debug("rule %s: model %s is not loaded here, so its references (%s) are not either", rule.id, name, reference)
            continue
        out.append(Needed(rule.id, name, reference))
    return out


def for_rules(config: Config, embedder_of: Callable[[str], object | None], folder: Path | None = None,
              only_cached: bool = False, on_unreadable: Callable[[str], None] | None = None,
              embed_with: Callable | None = None) -> dict[str, References]:
    """{rule id: its references, embedded} for the rules whose ``not_like`` names a reference and
    whose embedding model is loaded; run it where the models run. ``folder``: where embedded
    references are kept between starts. ``only_cached``: what is kept there, embedding nothing.
    ``on_unreadable``: told (the message) of a reference that cannot be read, the other rules' are
    still embedded; without it a ReferenceUnreadable ends it. ``embed_with``: see ``embed_reference``."""
    done: dict[tuple[str, str], References | None] = {}
    out: dict[str, References] = {}
    for need in needed(config, embedder_of):
        key = (need.model, need.reference)
        if key not in done:
            embedder = embedder_of(need.model)
            found = cached(config, embedder, need.reference, folder) if folder is not None else None
            if found is None and not only_cached:
                try:
                    found = embed_and_keep(config, embedder, need.reference, folder, embed_with) if folder is not None \
                        else embed_reference(config, embedder, need.reference, embed_with)
                except ReferenceUnreadable as exc:
                    message = f"rules.{need.rule_id}.not_like.reference: {exc}"
                    if on_unreadable is None:
                        raise ReferenceUnreadable(message) from None
                    on_unreadable(message)
                    done[key] = None
                    continue
                log.info("rule %s: %d reference windows of %s guard what is taught as its false alarms", need.rule_id,
                         len(found), need.reference)
            done[key] = found
        if done[key] is not None:
            out[need.rule_id] = done[key]
    return out

