"""A bank of examples: embeddings, each with its label (or ``not:<rule>``) and where it came from.

An embedding is comparable with another only when the same model made it from a window of the
same length at the same rate: ``Embedder`` is that fingerprint, and a bank from another one is
refused with a message (the hop does not matter: each window is embedded on its own).

The file is a plain ``.npz`` (no pickles), written atomically (a temporary file in the same folder,
fsync, rename), owner-only (0600); the version it replaces is kept as ``BANK.npz.1`` (older ones
move to ``.2`` ... ``.KEEP``); a symlinked bank path writes (and locks) the file it points to. Members
are stored uncompressed, and a deflated one (a zip bomb) is refused unread. Reading checks every
member's header before allocating anything, so
a truncated, garbage or hostile file (a huge claimed shape, an object array) is a clear
``BankError``, never a crash or a giant allocation.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from monitord.config.checks import NEGATIVE  # one spelling: the config refuses labels that start with it

log = logging.getLogger(__name__)

FORMAT = "monitord.examples/1"
KEEP = 5
"""Earlier versions kept beside the bank."""
MAX_EXAMPLES = 200_000
MAX_DIM = 4096
MAX_TEXT = 4096


class BankError(Exception):
    """A bank file that cannot be read or does not fit; the message says why."""


@dataclass(frozen=True)
class Embedder:
    """What makes two embeddings comparable."""

    model_id: str
    """The embedding model's id (``yamnet:builtin``, a CLAP checkpoint)."""
    dim: int
    sample_rate: int
    window_s: float

    def mismatch(self, other: "Embedder") -> str | None:
        """Why embeddings of ``other`` cannot be compared with these (None: they can)."""
        if other.model_id != self.model_id:  # (the dimension of this model's embeddings may not be known yet)
            return f"embeddings of {other.model_id} ({other.dim}-d), not {self.model_id}"
        if other.dim != self.dim:
            return f"{other.dim}-d embeddings of {other.model_id}, not {self.dim}-d"
        if other.sample_rate != self.sample_rate or abs(other.window_s - self.window_s) > 1e-9:
            return (f"{other.window_s:g} s windows at {other.sample_rate} Hz, not {self.window_s:g} s at "
                    f"{self.sample_rate} Hz")
        return None


@dataclass(frozen=True, eq=False)
class Bank:
    embedder: Embedder
    embeddings: np.ndarray
    """(N, D) float32, L2-normalised."""
    ids: np.ndarray
    """(N,) int64, never reused (``next_id`` only grows)."""
    labels: np.ndarray
    """(N,) str: a label, or ``not:<rule id>`` for a rule's false alarm."""
    sources: np.ndarray
    """(N,) str: where the window came from (``file:PATH@START``, ``clip:PATH@START``, ``event:SEQ@START``)."""
    added: np.ndarray
    """(N,) str: when it was taught (UTC, ISO 8601)."""
    next_id: int = 1

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def empty(cls, embedder: Embedder) -> "Bank":
        return cls(embedder, np.zeros((0, embedder.dim), np.float32), np.zeros(0, np.int64), np.zeros(0, "<U1"),
                   np.zeros(0, "<U1"), np.zeros(0, "<U1"))

    def add(self, embeddings: np.ndarray, label: str, sources: Sequence[str]) -> "Bank":
        """A bank with these examples added (normalised here), each under a new id."""
        embeddings = np.asarray(embeddings, dtype=np.float32).reshape(-1, self.embedder.dim)
        if len(sources) != len(embeddings):
            raise ValueError(f"{len(embeddings)} embeddings but {len(sources)} sources")
        if not label or len(label) > 200 or label.strip() != label:
            raise ValueError(f"bad label {label!r}")
        if len(self) + len(embeddings) > MAX_EXAMPLES:  # load() refuses more: the bank would be lost
            raise ValueError(f"a bank holds at most {MAX_EXAMPLES} examples ({len(self)} now, {len(embeddings)} more): "
                             f"forget some (monitord teach --forget) or start another bank")
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        if not np.all(np.isfinite(embeddings)) or np.any(norms == 0):
            raise ValueError("an embedding is zero or not finite")
        n = len(embeddings)
        # a file name that is not UTF-8 comes as lone surrogates (surrogateescape): as the replacement
        # character, since load() refuses text that is not Unicode
        sources = [str(s).encode("utf-8", "surrogateescape").decode("utf-8", "replace")[:MAX_TEXT] for s in sources]
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return replace(self, embeddings=np.concatenate([self.embeddings, embeddings / norms]).astype(np.float32),
                       ids=np.concatenate([self.ids, np.arange(self.next_id, self.next_id + n, dtype=np.int64)]),
                       labels=np.concatenate([self.labels.astype(str), np.full(n, label)]),
                       sources=np.concatenate([self.sources.astype(str), np.asarray(sources, dtype=str)]),
                       added=np.concatenate([self.added.astype(str), np.full(n, now)]), next_id=self.next_id + n)

    def forget(self, ids: Sequence[int]) -> "Bank":
        """A bank without these examples; an unknown id is a KeyError."""
        unknown = sorted(set(ids) - set(self.ids.tolist()))
        if unknown:
            raise KeyError(f"no example with id {', '.join(map(str, unknown))}")
        keep = ~np.isin(self.ids, list(ids))
        return replace(self, embeddings=self.embeddings[keep], ids=self.ids[keep], labels=self.labels[keep],
                       sources=self.sources[keep], added=self.added[keep])

    def where(self, label: str) -> np.ndarray:
        """Boolean mask of the examples of ``label`` (cached: a bank is immutable, asked per window)."""
        mask = self.__dict__.setdefault("_masks", {}).get(label)
        if mask is None:
            mask = self.__dict__["_masks"][label] = self.labels == label
        return mask

    def of(self, label: str) -> tuple[np.ndarray, np.ndarray]:
        """(indices, embeddings) of the examples of ``label``, cached (a copy made once per bank, not per window)."""
        cache = self.__dict__.setdefault("_of", {})
        if label not in cache:
            indices = np.flatnonzero(self.where(label))
            cache[label] = (indices, np.ascontiguousarray(self.embeddings[indices]))
        return cache[label]

    def positive_labels(self) -> list[str]:
        return sorted({str(label) for label in self.labels if not str(label).startswith(NEGATIVE)})

    def check(self, embedder: Embedder, what: str) -> None:
        """Raise BankError when this bank's embeddings cannot be compared with ``embedder``'s."""
        why = embedder.mismatch(self.embedder) if embedder != self.embedder else None
        if why:
            raise BankError(f"{what}: the bank holds {why}: teach it again with this config "
                            f"(or point {what} at another bank)")


def negative(rule_id: str) -> str:
    """The label a rule's false alarms are taught under."""
    return f"{NEGATIVE}{rule_id}"


def save(bank: Bank, path: str | Path, keep: int = KEEP) -> None:
    """Write atomically, owner-only, keeping the replaced version as PATH.1 (older: .2 ... .keep)."""
    path = Path(path).resolve()  # a symlink stays one: the file it points to is replaced
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, format=np.str_(FORMAT), model_id=np.str_(bank.embedder.model_id), dim=np.int64(bank.embedder.dim),
                     sample_rate=np.int64(bank.embedder.sample_rate), window_s=np.float64(bank.embedder.window_s),
                     next_id=np.int64(bank.next_id), embeddings=bank.embeddings.astype(np.float32),
                     ids=bank.ids.astype(np.int64), labels=bank.labels.astype(str), sources=bank.sources.astype(str),
                     added=bank.added.astype(str))
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            for i in range(keep - 1, 0, -1):
                older = folder / f"{path.name}.{i}"
                if older.exists():
                    os.replace(older, folder / f"{path.name}.{i + 1}")
            link = folder / f".{path.name}.{os.getpid()}.prev"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)
            os.link(path, link)  # the current version stays in place until the new one replaces it
            os.replace(link, folder / f"{path.name}.1")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold the bank's lock (a ``.lock`` file beside it) for a read-modify-write (beside the file a
    symlinked path points to: every name of one bank takes the same lock)."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent / f".{path.name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


_SHAPES = {"format": 0, "model_id": 0, "dim": 0, "sample_rate": 0, "window_s": 0, "next_id": 0, "embeddings": 2,
           "ids": 1, "labels": 1, "sources": 1, "added": 1}


def load(path: str | Path) -> Bank:
    """Read a bank; BankError (with the reason) for anything that is not a sound monitord bank."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            arrays = {name: _member(archive, name, rank) for name, rank in _SHAPES.items()}
    except FileNotFoundError:
        raise BankError(f"bank {path} does not exist: teach it with `monitord teach`") from None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, KeyError) as exc:
        raise BankError(f"bank {path} is not a monitord bank ({exc})") from None
    for name, array in arrays.items():  # text the file holds is UCS-4: a code point past U+10FFFF (or a lone
        if array.dtype.kind == "U":      # surrogate) loads, and raises SystemError wherever it is made a str
            try:
                for text in np.atleast_1d(array).tolist():
                    text.encode("utf-8")
            except (SystemError, UnicodeError, ValueError):
                raise BankError(f"bank {path} is not a monitord bank ({name}: text that is not Unicode)") from None
    if str(arrays["format"]) != FORMAT:
        raise BankError(f"bank {path} is not a monitord examples bank (format {str(arrays['format'])[:80]!r})")
    try:
        embedder = Embedder(str(arrays["model_id"]), int(arrays["dim"]), int(arrays["sample_rate"]),
                            float(arrays["window_s"]))
        if not (0 < embedder.window_s < 1e6 and 0 < embedder.sample_rate < 10**7):  # NaN: never a mismatch
            raise ValueError(f"window {embedder.window_s} s at {embedder.sample_rate} Hz")
        e = arrays["embeddings"]
        n = len(arrays["ids"])
        if e.dtype != np.float32 or e.shape != (n, embedder.dim) or not 0 < embedder.dim <= MAX_DIM:
            raise ValueError(f"embeddings {e.dtype} {e.shape} for {n} examples of dimension {embedder.dim}")
        if any(len(arrays[k]) != n for k in ("labels", "sources", "added")):
            raise ValueError("ids, labels, sources and added differ in length")
        if arrays["ids"].dtype.kind != "i" or len(set(arrays["ids"].tolist())) != n:
            raise ValueError("ids are not unique integers")
        if not np.all(np.isfinite(e)):
            raise ValueError("an embedding is not finite")
        next_id = int(arrays["next_id"])
        if n and next_id <= int(arrays["ids"].max()):
            raise ValueError("next_id is not above every id")
    except (TypeError, ValueError) as exc:
        raise BankError(f"bank {path} is not a sound monitord bank ({exc})") from None
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    return Bank(embedder, (e / np.maximum(norms, 1e-12)).astype(np.float32), arrays["ids"].astype(np.int64),
                arrays["labels"].astype(str), arrays["sources"].astype(str), arrays["added"].astype(str), next_id)


def _member(archive: zipfile.ZipFile, name: str, rank: int) -> np.ndarray:
    """One array, its header checked (rank, dtype, a size that fits the member) before it is read."""
    info = archive.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        # save() stores members as they are: a deflated one is not ours, and may be a zip bomb
        raise ValueError(f"{name}: a compressed member (a monitord bank stores its arrays uncompressed)")
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"{name}: unsupported npy version {version}")
        if len(shape) != rank or dtype.hasobject or dtype.kind not in "iufU":
            raise ValueError(f"{name}: unexpected array {dtype} {shape}")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count * dtype.itemsize > info.file_size or (rank and shape[0] > MAX_EXAMPLES) or \
                (rank == 2 and shape[1] > MAX_DIM) or \
                (dtype.kind == "U" and dtype.itemsize // 4 > MAX_TEXT):
            raise ValueError(f"{name}: claims {shape} of {dtype}, more than the file holds or a bank may have")
    with archive.open(info) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


class BankFile:
    """A bank on disk, read again whenever the file changes (so teaching applies at once, with no
    restart); a file that became unreadable keeps the last good version (and is logged once)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._bank: Bank | None = None
        self._error: str | None = None

    def get(self) -> Bank | None:
        """The bank as it is now (None: there is none yet, or none was ever readable)."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp != self._stamp:
            self._stamp = stamp
            if stamp is None:
                return self._bank
            try:
                self._bank, self._error = load(self.path), None
                log.info("bank %s: %d examples", self.path, len(self._bank))
            except BankError as exc:
                if str(exc) != self._error:
                    log.warning("%s; keeping the last version read", exc)
                self._error = str(exc)
        return self._bank
