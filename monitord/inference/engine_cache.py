"""Where converted models live, and when a converted model may be reused.

A conversion (torch -> OpenVINO IR, torch -> ONNX) is done once and kept in
``<model dir>/.monitord-engine/<engine>-<fingerprint>/``, or, where the model folder is not writable
or the model is a Hugging Face id, under the state directory (``$STATE_DIRECTORY``,
``$XDG_STATE_HOME/monitord`` or ``~/.local/state/monitord``) in ``engine-cache/<model>/``.

The fingerprint is a digest of what the converted model depends on: the module's weights (their
bytes, so a changed checkpoint never matches, however its files were copied), its config, the
engine and its version, torch and transformers versions, the wrapper and its input shapes. A folder
is written under a temporary name and renamed when complete, and its manifest lists each file with
its size and digest: a folder that does not match its manifest (an interrupted copy, a truncated
file) is refused, removed and converted again. Folders of the same engine with another fingerprint
are stale (the weights or a version changed) and are removed once the new one is in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FOLDER = ".monitord-engine"
MANIFEST = "manifest.json"
FORMAT = 1
"""Bumped when what is written into a cache folder changes meaning."""
PROGRESS_EVERY_S = 10.0


def cache_root(model_ref: str, override: Path | None = None) -> Path:
    """The folder holding a model's converted versions (created here)."""
    if override is not None:
        override.mkdir(parents=True, exist_ok=True)
        return override
    local = Path(model_ref).expanduser()
    if local.is_dir() and os.access(local, os.W_OK):
        try:
            root = local / FOLDER
            root.mkdir(exist_ok=True)
            if os.access(root, os.W_OK):  # made by another user (sudo monitord teach): not ours to write
                return root
            log.info("engine cache: cannot write in %s: using the state directory", root)
        except OSError as exc:
            log.info("engine cache: cannot write in %s (%s): using the state directory", local, exc)
    from monitord.config import state_dir

    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(local.resolve()) if local.is_dir() else model_ref).strip("_.") or "model"
    root = state_dir() / "engine-cache" / slug
    root.mkdir(parents=True, exist_ok=True)
    return root


def fingerprint(module: Any, parts: dict[str, str]) -> str:
    """sha256 over ``parts`` (versions, config, shapes) and every weight and buffer of ``module``
    (float32, on the CPU)."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode())
    for name, tensor in module.state_dict().items():
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
        digest.update(memoryview(array.reshape(-1).view("u1")))
    return digest.hexdigest()


@dataclass(frozen=True)
class CachedModel:
    folder: Path
    manifest: dict[str, Any]
    converted: bool
    """True where this load converted it; False where a cached conversion was reused."""


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _problem(folder: Path, fp: str) -> str | None:
    """Why ``folder`` cannot be used for fingerprint ``fp``; None where it can."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        return f"no readable manifest ({exc})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("fingerprint") != fp:
        return "its manifest is for another model or format"
    try:
        for name, meta in manifest.get("files", {}).items():
            path = folder / name
            if not path.is_file() or path.stat().st_size != meta["size"]:
                return f"{name} is missing or has the wrong size"
            if _file_digest(path) != meta["sha256"]:
                return f"{name} does not match its digest"
    except (AttributeError, KeyError, TypeError, OSError) as exc:  # valid JSON of the wrong shape: damaged
        return f"a damaged manifest ({type(exc).__name__}: {exc})"
    return None


def _remove(path: Path) -> None:
    """Remove a cache entry: a folder with what is in it, or a file or symlink put in its place
    (only the link: never what a symlink points to)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _still_converting(what: str, engine: str, began: float, every_s: float = PROGRESS_EVERY_S) -> Iterator[None]:
    """A log line every ``every_s`` while a conversion runs (a full-size one takes a minute or more)."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every_s):
            log.info("%s: still converting to %s, %.0f s", what, engine, time.monotonic() - began)

    thread = threading.Thread(target=beat, name="engine-convert-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def load_or_convert(root: Path, engine: str, fp: str, convert: Callable[[Path], None], what: str,
                    details: dict[str, Any]) -> CachedModel:
    """The cached conversion for ``fp`` in ``root``, or a fresh one: ``convert(folder)`` writes the
    engine's files into an empty folder, which is then sealed with a manifest and renamed into place."""
    folder = root / f"{engine}-{fp[:20]}"
    if folder.exists() or folder.is_symlink():
        problem = "not a folder (a file or a symlink)" if folder.is_symlink() or not folder.is_dir() else _problem(folder, fp)
        if problem is None:
            log.info("%s: %s model from the cache %s", what, engine, folder)
            return CachedModel(folder, json.loads((folder / MANIFEST).read_text()), converted=False)
        log.warning("%s: refusing the cached %s model in %s: %s; converting again", what, engine, folder, problem)
        _remove(folder)
    stale = [p for p in root.glob(f"{engine}-*") if p.is_dir() and p != folder]
    if stale:
        log.info("%s: the cached %s model is stale (weights, config or a version changed): converting again", what, engine)
    tmp = root / f".tmp-{engine}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        began = time.monotonic()
        log.info("%s: converting to %s, once (cached in %s)", what, engine, root)
        with _still_converting(what, engine, began):
            convert(tmp)
        files = {p.name: {"size": p.stat().st_size, "sha256": _file_digest(p)} for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = dict(format=FORMAT, engine=engine, fingerprint=fp, created=time.time(), files=files, **details)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        try:
            tmp.rename(folder)
        except OSError:  # another process (a second replica) finished the same conversion first
            if _problem(folder, fp) is not None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("%s: converted to %s in %.1f s", what, engine, time.monotonic() - began)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in stale:
        _remove(old)
    return CachedModel(folder, manifest, converted=True)
