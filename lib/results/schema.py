"""The schema of a run's summary.json, and the check every reader of one applies (``record_problem``).

A record that breaks it anywhere (a string where a number belongs, ``best.val.accuracy: "x"``) is not
used: the run shows as unreadable and the folder's summary keeps the last good record. Every field is
optional (a failed run's record has a few) and may be null, but ``name`` and ``status``; keys the schema
does not name are allowed, so a record written by a newer harness still reads.

A schema is a dict of field -> kind; ``"*"`` gives the kind of the keys it does not name. A kind is a type
name (``number`` is an int or a float, never a bool), a nested dict, or ``("list", kind)`` / ``("map",
kind)`` for a list or an object whose every item has that kind.
"""

from __future__ import annotations

from typing import Any

Kind = Any
NUMBER, INT, STR, BOOL, ANY = "number", "int", "str", "bool", "any"


def _list(kind: Kind) -> tuple[str, Kind]:
    return ("list", kind)


def _map(kind: Kind) -> tuple[str, Kind]:
    return ("map", kind)


SPEC = {"schema": INT, "name": STR, "model": STR, "seed": INT, "optim": {"lr": NUMBER, "*": ANY},
        "prune": {"method": STR, "target": NUMBER, "*": ANY}, "train": _map(ANY), "hardware": _map(ANY),
        "*": ANY}
RECORD = {
    "name": STR, "status": STR, "error": STR, "flags": _list(STR), "recorded_status": STR, "started_at": STR,
    "metric": {"name": STR, "higher_is_better": BOOL, "unit": STR},
    "best": {"step": INT, "val": _map(NUMBER)},
    "test_at_best": _map(NUMBER),
    "sparsity": {"target": NUMBER, "reached": NUMBER, "prunable_params": INT, "cut_by_surgery": NUMBER,
                 "total_params": INT, "*": ANY},  # and the method's own facts (pattern, structures, ...)
    "steps": _map(INT),
    "memory": {"state_bytes": _map(NUMBER), "*": NUMBER},
    "throughput": {"unit": STR, "value": NUMBER},
    "mfu": {"value": NUMBER, "flops_per_sample": NUMBER, "peak_flops": NUMBER, "gpu": STR, "peak_source": STR},
    "activations": {"policy": STR, "segments": _list(ANY), "measured_bytes": NUMBER, "measured_at": STR,
                    "*": NUMBER},
    "hardware": {"micro_batch": INT, "grad_accum": INT, "world_size": INT, "planned_micro_batch": INT,
                 "probe": _list(ANY)},
    "wall_time_s": NUMBER,
    "resumed": {"count": INT, "from_steps": _list(INT)},
    "surgery": _list(ANY),
    "structure_stats": _map(INT),
    "spec": SPEC,
    "provenance": {"commit": STR, "dirty": BOOL, "versions": _map(STR), "device": STR, "threads": INT,
                   "world_size": INT, "data": _map(ANY), "*": ANY},
    "*": ANY,
}
REQUIRED = ("name", "status")


def schema_problem(record: Any, schema: dict[str, Kind] = RECORD) -> str | None:
    """Where ``record`` breaks ``schema`` ("field 'best.val.accuracy' is 'x', expected a number"), or None."""
    if not isinstance(record, dict):
        return f"is a JSON {_json_name(record)}, not an object"
    for key in REQUIRED:
        if not isinstance(record.get(key), str):
            return f"field {key!r} is {record.get(key)!r}, expected a string"
    return _check(record, schema, "")


def _check(value: Any, kind: Kind, where: str) -> str | None:
    if value is None or kind == ANY:
        return None
    if isinstance(kind, dict):
        if not isinstance(value, dict):
            return _wrong(where, value, "an object")
        for key, item in value.items():
            problem = _check(item, kind.get(key, kind.get("*", ANY)), f"{where}.{key}" if where else str(key))
            if problem:
                return problem
        return None
    if isinstance(kind, tuple):
        shape, inner = kind
        if shape == "list" and isinstance(value, list):
            items = [(f"{where}[{index}]", item) for index, item in enumerate(value)]
        elif shape == "map" and isinstance(value, dict):
            items = [(f"{where}.{key}", item) for key, item in value.items()]
        else:
            return _wrong(where, value, "a list" if shape == "list" else "an object")
        return next((problem for at, item in items if (problem := _check(item, inner, at))), None)
    if not _is(value, kind):
        return _wrong(where, value, {"number": "a number", "int": "a whole number", "str": "a string",
                                     "bool": "true or false"}[kind])
    return None


def _is(value: Any, kind: str) -> bool:
    if isinstance(value, bool):
        return kind == BOOL
    if kind == NUMBER:
        return isinstance(value, (int, float))
    if kind == INT:
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return isinstance(value, {"str": str, "bool": bool}[kind])


def _wrong(where: str, value: Any, expected: str) -> str:
    shown = repr(value) if not isinstance(value, (dict, list)) else f"a JSON {_json_name(value)}"
    return f"field {where!r} is {shown[:60]}, expected {expected}"


def _json_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")
