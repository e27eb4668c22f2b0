"""Character cards and lorebooks: reading V1/V2/V3 card JSON, PNG cards and TOML.

A card is the ``chara_card_v2`` / ``chara_card_v3`` JSON of SillyTavern and most
character tools, either as a file or base64 in a PNG's ``chara`` (V2) or ``ccv3`` (V3)
text chunk; a TOML card holds the same fields as the card's ``data`` object. What cards
do not carry (allowed actions, emotions) comes from ``data.extensions.parley``.
"""

from __future__ import annotations

import base64
import json
import struct
import tomllib
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import ConfigError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CARD_SUFFIXES = (".json", ".png", ".toml")
T = TypeVar("T")


class LoreEntry(BaseModel):
    """One lorebook entry (the V2 ``character_book`` entry, with V3's ``use_regex``)."""

    model_config = ConfigDict(extra="ignore")

    keys: list[str] = []
    content: str = ""
    enabled: bool = True
    insertion_order: int = 0
    case_sensitive: bool = False
    name: str = ""
    priority: int = 0
    selective: bool = False
    secondary_keys: list[str] = []
    constant: bool = False
    use_regex: bool = False


class Lorebook(BaseModel):
    """A V2 ``character_book``: entries plus how deep to scan and how much to insert."""

    model_config = ConfigDict(extra="ignore")

    name: str = ""
    scan_depth: int | None = Field(default=None, ge=0)
    token_budget: int | None = Field(default=None, ge=0)
    recursive_scanning: bool | None = None
    entries: list[LoreEntry] = []


class NpcExtras(BaseModel):
    """``data.extensions.parley``: what a game needs that cards do not carry."""

    model_config = ConfigDict(extra="forbid")

    actions: list[str] = []  # the allow-list: no other action is ever returned
    emotions: list[str] = []  # empty: the plugin's configured set


class Card(BaseModel):
    """A character: the card's ``data`` fields the prompt uses."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1)
    description: str = ""
    personality: str = ""
    scenario: str = ""
    first_mes: str = ""
    mes_example: str = ""
    system_prompt: str = ""
    post_history_instructions: str = ""
    character_book: Lorebook | None = None
    extensions: dict[str, Any] = {}
    spec: str = "chara_card_v1"

    @property
    def extras(self) -> NpcExtras:
        """The card's ``extensions.parley`` (validated when the card is loaded)."""
        return NpcExtras.model_validate(self.extensions.get("parley") or {})


def png_text_chunks(data: bytes) -> dict[str, str]:
    """The ``tEXt`` and ``zTXt`` chunks of a PNG, by keyword (Latin-1 text, as PNG says)."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG file")
    chunks: dict[str, str] = {}
    offset = len(PNG_SIGNATURE)
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        body = data[offset + 8:offset + 8 + length]
        if len(body) < length:
            raise ValueError("the PNG is truncated")
        if kind in (b"tEXt", b"zTXt"):
            keyword, _, rest = body.partition(b"\x00")
            if kind == b"zTXt":
                rest = zlib.decompress(rest[1:])  # first byte: compression method (0)
            chunks[keyword.decode("latin-1")] = rest.decode("latin-1")
        if kind == b"IEND":
            break
        offset += 12 + length  # length, type, body, CRC
    return chunks


def png_with_text(image: bytes, keyword: str, text: str) -> bytes:
    """``image`` (a PNG) with a ``tEXt`` chunk added before its end: how tools embed cards."""
    body = keyword.encode("latin-1") + b"\x00" + text.encode("latin-1")
    chunk = struct.pack(">I4s", len(body), b"tEXt") + body
    chunk += struct.pack(">I", zlib.crc32(b"tEXt" + body) & 0xFFFFFFFF)
    end = image.rindex(b"IEND") - 4
    return image[:end] + chunk + image[end:]


def card_from_json(raw: Any) -> Card:
    """A card from parsed card JSON: V2/V3 (``spec`` + ``data``) or V1 (flat fields)."""
    if not isinstance(raw, dict):
        raise ValueError("a card must be a JSON object")
    spec = raw.get("spec")
    if spec in ("chara_card_v2", "chara_card_v3"):
        data = raw.get("data")
        if not isinstance(data, dict):
            raise ValueError(f"a {spec} card needs a data object")
        return _validated({**data, "spec": spec})
    if spec is not None:
        raise ValueError(f"unknown card spec {spec!r}")
    return _validated(raw)


def _validated(data: dict[str, Any]) -> Card:
    card = Card.model_validate(data)
    NpcExtras.model_validate(card.extensions.get("parley") or {})
    return card


def problems(exc: ValidationError) -> str:
    """A validation error as ``field: reason; ...``."""
    return "; ".join((".".join(map(str, e["loc"])) or "body") + ": " + e["msg"]
                     for e in exc.errors())


def _read(path: Path, parse: Callable[[Path], T]) -> T:
    """``parse(path)``, its failures as a ConfigError naming the file and the reason."""
    try:
        return parse(path)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {problems(exc)}") from None
    except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _parse_card(path: Path) -> Card:
    if path.suffix == ".png":
        chunks = png_text_chunks(path.read_bytes())
        text = chunks.get("ccv3") or chunks.get("chara")  # V3 wins when both are there
        if text is None:
            raise ValueError("the PNG has no chara or ccv3 text chunk")
        return card_from_json(json.loads(base64.b64decode(text)))
    if path.suffix == ".toml":
        return _validated(tomllib.loads(path.read_text("utf-8")))
    return card_from_json(json.loads(path.read_text("utf-8")))


def load_card(path: Path) -> Card:
    """The card in ``path`` (.json, .png or .toml); raises ConfigError saying why not."""
    return _read(path, _parse_card)


def load_cards(folder: Path) -> dict[str, Card]:
    """Every card file in ``folder``, by id (the file's stem)."""
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder of cards")
    cards: dict[str, Card] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix not in CARD_SUFFIXES:
            continue
        if path.stem in cards:
            raise ConfigError(f"{path}: two cards have the id {path.stem!r}")
        cards[path.stem] = load_card(path)
    return cards


def _parse_lorebook(path: Path) -> Lorebook:
    if path.suffix == ".toml":
        raw: Any = tomllib.loads(path.read_text("utf-8"))
    else:
        raw = json.loads(path.read_text("utf-8"))
    if isinstance(raw, dict) and "data" in raw and "spec" in raw:
        raw = raw["data"].get("character_book") or {}  # a whole card: its book
    return Lorebook.model_validate(raw)


def load_lorebook(path: Path) -> Lorebook:
    """A shared lorebook: a ``character_book`` object as JSON (or a card's, or TOML)."""
    return _read(path, _parse_lorebook)
