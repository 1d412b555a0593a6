"""The ``meta`` JSON object stored with an added image: what is accepted, and how it is shown.

A client's metadata is stored as text and served to anyone who can read the item, so it is
checked at the add for everything that could break a later answer: nesting (the JSON
encoder and pydantic both recurse), non-finite numbers (not JSON; they would come back as
null), lone surrogates (not encodable as UTF-8) and very long keys or strings.
"""

from __future__ import annotations

import json
import math
from typing import Any

from models.errors import BadInput

MAX_DEPTH = 8  # {"a": {"b": 1}} has depth 2
MAX_KEY_CHARS = 100
MAX_STRING_CHARS = 2_000
MAX_INT = 2**53  # what every JSON reader (JavaScript's included) holds exactly
SHOWN_ERROR = "stored metadata cannot be shown: "


class MetaError(ValueError):
    """Metadata outside the accepted shape; the message says where."""


def _reject_constant(name: str) -> Any:
    raise MetaError(f"{name} is not a JSON number (numbers must be finite)")


def _text(value: str, where: str, limit: int) -> None:
    if len(value) > limit:
        raise MetaError(f"{where}: text longer than {limit} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise MetaError(f"{where}: not valid Unicode (a lone surrogate)") from None


def check_value(value: Any, where: str = "meta", depth: int = 1) -> None:
    """Raise MetaError unless ``value`` (parsed JSON) fits the limits above."""
    if isinstance(value, dict | list) and depth > MAX_DEPTH:
        raise MetaError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            _text(key, f"{where}: a key", MAX_KEY_CHARS)
            check_value(item, f"{where}.{key[:20]}", depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_value(item, f"{where}[{i}]", depth + 1)
    elif isinstance(value, str):
        _text(value, where, MAX_STRING_CHARS)
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        if abs(value) > MAX_INT:
            raise MetaError(f"{where}: integer beyond +-2**53")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise MetaError(f"{where}: numbers must be finite")
    else:
        raise MetaError(f"{where}: {type(value).__name__} is not JSON")


def _parsed(text: str) -> dict[str, Any]:
    """JSON text -> a checked object, or MetaError saying why not."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise MetaError(f"nested deeper than {MAX_DEPTH} levels") from None
    except MetaError:
        raise
    except ValueError as exc:  # json.JSONDecodeError, and integers too long to convert
        raise MetaError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise MetaError('must be a JSON object, e.g. {"album": "Rome 2024"}')
    check_value(value)
    return value


def parse_meta(text: str | None) -> str | None:
    """A client's ``meta`` form field -> the JSON text to store, or BadInput (422) saying why."""
    if text is None:
        return None
    try:
        value = _parsed(text)
    except MetaError as exc:
        raise BadInput(f"meta: {exc}" if not str(exc).startswith("meta") else str(exc)) from None
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def shown_meta(stored: str | None) -> dict[str, Any]:
    """Stored metadata as an answer shows it; an item stored before these checks (or by a
    tampered table) that would break the answer gets an error note instead, never a 500."""
    if not stored:
        return {}
    try:
        return _parsed(stored)
    except MetaError as exc:
        return {"error": SHOWN_ERROR + str(exc)[:200]}
