"""Building our config dataclasses from diffusers/transformers config.json dicts, refusing what we lack."""

from __future__ import annotations

import dataclasses
from typing import Any


def dataclass_from_dict(
    cls,
    config: dict[str, Any],
    *,
    kind: str,
    source: str,
    feature_off: dict[str, tuple[Any, ...]] | None = None,
    ignored: tuple[str, ...] = (),
):
    """`cls(**fields)` from a config dict.

    Keys starting with "_" and those in `ignored` are dropped. A key in `feature_off` is accepted only at
    one of its listed values (the ones that mean "feature off"). Any other key must be a field of `cls`.
    Every refused key is named in one ValueError, prefixed by `source` (the file it came from).
    Lists become tuples so that configs stay hashable.
    """
    feature_off = feature_off or {}
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs, problems = {}, []
    for key, value in config.items():
        if key.startswith("_") or key in ignored:
            continue
        if key in known:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        elif key in feature_off:
            off = feature_off[key]
            if isinstance(value, list):
                value = any(value)
            if value not in off:
                problems.append(f"{key}={value!r} (supported: {' or '.join(map(repr, off))})")
        else:
            problems.append(f"{key} (unknown field)")
    if problems:
        raise ValueError(f"{source}: {kind} config fields not supported: " + "; ".join(problems))
    return cls(**kwargs)


def dataclass_to_dict(obj, class_name: str) -> dict[str, Any]:
    out: dict[str, Any] = {"_class_name": class_name}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out
