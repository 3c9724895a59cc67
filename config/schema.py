"""The settings tree as a JSON Schema, derived from the dataclasses of :mod:`config.settings`.

The Helm chart validates its ``config`` values with it (``helm/tollgate/values.schema.json``), so ``helm install``
refuses an unknown key, a wrong type, a choice that does not exist or a negative number by the same names the loader
uses at start-up. What a schema cannot say (a model's pool must exist, a schema file must be on disk) the loader
still checks when the pod starts.

Usage::

    schema = settings_schema()
    python -m config.schema helm/tollgate/values.schema.json     # rewrite the file's "config" property

The schema keeps to draft-07 keywords, which every Helm 3 and 4 release understands.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

from config.settings import POSITIVE_SETTINGS, SHORTHAND, TOKEN_MIN_CHARS, Settings

# Helm reads numbers in values as 64-bit floats: integers past this would change on their way to the pods.
_LARGEST_EXACT_INTEGER: Final = 2**53 - 1
# Constraints on one key that its type does not carry; the loader checks the same.
_EXTRA: Final[Mapping[str, Mapping[str, Any]]] = {
    "server.port": {"maximum": 65535},
    "admin.token": {"anyOf": [{"const": ""}, {"minLength": TOKEN_MIN_CHARS}]},
    "metrics.token": {"anyOf": [{"const": ""}, {"minLength": TOKEN_MIN_CHARS}]},
    "pools.*.workers[].url": {"pattern": "^https?://"},
    "pools.*.workers[].weight": {"exclusiveMinimum": 0},
}


def settings_schema() -> dict[str, Any]:
    """The JSON Schema of a complete or partial settings tree (every key has a default but a model's own)."""
    return _object(Settings, "")


def _object(cls: type[Any], path: str) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": {field.name: _value(hints[field.name], _join(path, field.name)) for field in fields},
    }
    required = [
        field.name
        for field in fields
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    ]
    if required:
        schema["required"] = required
    return schema


def _value(hint: Any, path: str) -> dict[str, Any]:
    schema = _typed(hint, path)
    schema.update(_EXTRA.get(path, {}))
    return schema


def _typed(hint: Any, path: str) -> dict[str, Any]:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        shape = _object(typing.cast(type, hint), path)
        if hint in SHORTHAND:  # a bare string stands for {<key>: string}
            return {"anyOf": [{"type": "string", **_EXTRA.get(_join(path, SHORTHAND[hint]), {})}, shape]}
        return shape
    if origin is Mapping:
        _, item = typing.get_args(hint)
        return {"type": "object", "additionalProperties": _value(item, path + ".*")}
    if origin is tuple:
        return {"type": "array", "items": _value(typing.get_args(hint)[0], path + "[]")}
    if origin is Literal:
        return {"enum": list(typing.get_args(hint))}
    if hint is bool:
        return {"type": "boolean"}
    if hint is str:
        return {"type": "string"}
    if hint in (int, float):
        bound = {"exclusiveMinimum": 0} if path in POSITIVE_SETTINGS else {"minimum": 0}
        if hint is float:
            return {"type": "number", **bound}
        return {"type": "integer", **bound, "maximum": _LARGEST_EXACT_INTEGER}
    raise TypeError(f"{path}: no JSON Schema for {hint!r}")  # a new kind of setting: teach it here


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def main(argv: list[str]) -> int:
    """Rewrite the ``config`` property of the values schema at ``argv[0]``, keeping the rest of the file."""
    if len(argv) != 1:
        print("usage: python -m config.schema <values.schema.json>", file=sys.stderr)  # noqa: T201
        return 2
    path = Path(argv[0])
    document = json.loads(path.read_text(encoding="utf-8"))
    document["properties"]["config"] = settings_schema()
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
