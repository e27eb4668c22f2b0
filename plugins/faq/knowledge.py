"""The FAQ knowledge base: entries ``{"id", "questions", "answer"}`` from a JSON or YAML file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Entry:
    """One question-and-answer of the knowledge base; ``questions`` are ways to ask it."""

    id: str
    questions: tuple[str, ...]
    answer: str


def load_entries(path: Path) -> list[Entry]:
    """The entries of ``path`` (``.json``, ``.yaml`` or ``.yml``), checked.

    Every problem is a :class:`ConfigError` naming the file and the entry.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the FAQ file: {exc}") from None
    raw = _parse(path, text)
    if isinstance(raw, dict) and "entries" in raw:
        raw = raw["entries"]
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{path}: expected a non-empty list of entries")
    return _check(path, raw)


def _parse(path: Path, text: str) -> Any:
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml  # PyYAML comes with the model extra; only YAML files need it
        except ImportError:
            raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml)") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None


def _check(path: Path, raw: Sequence[Any]) -> list[Entry]:
    entries: list[Entry] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        where = f"{path}: entries[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected an object with id, questions and answer")
        extra = set(item) - {"id", "questions", "answer"}
        if extra:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
        entry_id, questions, answer = item.get("id"), item.get("questions"), item.get("answer")
        if not isinstance(entry_id, str) or not entry_id.strip():
            raise ConfigError(f"{where}.id: expected a non-empty string")
        if entry_id in seen:
            raise ConfigError(f"{where}.id: {entry_id!r} is used twice")
        if (not isinstance(questions, list) or not questions
                or not all(isinstance(q, str) and q.strip() for q in questions)):
            raise ConfigError(f"{where}.questions: expected a non-empty list of questions")
        if not isinstance(answer, str) or not answer.strip():
            raise ConfigError(f"{where}.answer: expected a non-empty string")
        seen.add(entry_id)
        entries.append(Entry(entry_id, tuple(q.strip() for q in questions), answer.strip()))
    return entries
