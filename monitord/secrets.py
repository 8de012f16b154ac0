"""Secrets kept in files (shared tokens, passwords): read them, and tell when a file is too open.

Imported by the config checks and by the serve package alike, so neither imports the other.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

MIN_TOKEN_CHARS = 16


class TokenFileError(ValueError):
    """A token file that cannot be read or holds too short a secret (the message names the file)."""


def read_token(path: str) -> str:
    """The shared secret in a token file (surrounding whitespace ignored). Read when a replica or a
    capture node starts, not only when the config is checked: a file emptied in between must not
    become an empty secret that every request matches."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise TokenFileError(f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read {path}: {exc}") from None
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenFileError(f"{path} holds {len(token)} characters; a token needs at least {MIN_TOKEN_CHARS}")
    return token


def too_open(path: str | os.PathLike[str]) -> str | None:
    """Why a secret's file is readable by more than its owner, or None (also when it cannot be read)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        return f"{path} is readable by group or others (mode {stat.S_IMODE(mode):04o}): chmod 600 it"
    return None
