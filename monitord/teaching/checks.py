"""What ``monitord check-config`` reads of teaching: the banks and references a config names, opened
as ``run`` opens them, without loading a model."""

from __future__ import annotations

from pathlib import Path

from monitord.config import Config
from monitord.teaching.bank import BankError, Embedder, load
from monitord.teaching.references import AUDIO_SUFFIXES, audio_in
from monitord.teaching.teach import TeachError, embedding_model_for


def configured_model_id(config: Config, model_name: str) -> str:
    """The model id a model's embeddings carry, from the config alone (nothing is loaded)."""
    from monitord.config import BUILTIN

    model = config.models[model_name]
    if model.kind == "yamnet":
        return "yamnet:builtin" if model.model == BUILTIN else str(model.model)
    return str(model.model)


def check_banks(config: Config) -> tuple[list[str], list[str]]:
    """(problems, notes) of the banks and references a config names, read from disk as ``run`` reads
    them: a bank of another model's embeddings or window length, a file that is no bank, a folder it
    cannot be written to, a reference that holds no recordings. A bank not taught yet is a note."""
    import os

    from monitord.config import BUILTIN_REFERENCES

    problems: list[str] = []
    notes: list[str] = []
    seen: set[tuple[Path, str]] = set()

    def check(where: str, path: Path, model_name: str) -> None:
        if (path, model_name) in seen:  # rules of one model share a bank: said once
            return
        seen.add((path, model_name))
        if path.exists():
            try:
                bank = load(path)
            except BankError as exc:
                problems.append(f"{where}: {exc}")
                return
            dim = 1024 if config.models[model_name].kind == "yamnet" else bank.embedder.dim  # CLAP's: known once loaded
            expected = Embedder(configured_model_id(config, model_name), dim, bank.embedder.sample_rate, config.window.seconds)
            why = expected.mismatch(bank.embedder)
            if why:
                problems.append(f"{where}: {path} holds {why} (model {model_name} embeds here, {config.window.seconds:g} s "
                                f"windows): point it at another bank, or teach this one again")
            else:
                notes.append(f"{where}: {path}: {len(bank)} examples")
            return
        folder = next((p for p in path.parents if p.exists()), None)
        if folder is None or not os.access(folder, os.W_OK | os.X_OK):
            problems.append(f"{where}: {path} does not exist, and cannot be created ({folder} is not writable)")
        else:
            notes.append(f"{where}: {path} does not exist yet: the first example taught creates it")

    for name, model in config.models.items():
        if model.kind == "examples":
            check(f"models.{name}.bank", Path(model.bank), model.embedding_model)
    for rule in config.rules:
        if rule.not_like is None:
            continue
        try:
            model_name = embedding_model_for(config, Path(rule.not_like.bank), rule.id, None)
        except TeachError as exc:
            problems.append(f"rules.{rule.id}.not_like: {exc}")
            continue
        check(f"rules.{rule.id}.not_like.bank", Path(rule.not_like.bank), model_name)
        reference = rule.not_like.reference
        if reference is None:
            notes.append(f"rules.{rule.id}.not_like: no reference recordings: only \"yes, this\" guards its recall "
                         f"(margin {rule.not_like.margin:g})")
        elif reference not in BUILTIN_REFERENCES:
            where = Path(reference)
            if not audio_in(where):
                problems.append(f"rules.{rule.id}.not_like.reference: {where} holds no recordings "
                                f"(audio files: {', '.join(AUDIO_SUFFIXES)})")
    return problems, notes
