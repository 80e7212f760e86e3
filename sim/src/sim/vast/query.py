"""Vast's query language: ``field → {op: value}`` filters and ``order`` lists, for offers and instances.

vastai-api.md: ops ``eq neq gt gte lt lte in notin``; the CLI sends numbers as strings ("1") and GB fields
already ×1000, so numeric strings are compared as numbers. ``geolocation`` ("City, CC") also matches its
two-letter country code, which is what the CLI's examples filter on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Final

OPS: Final = frozenset({"eq", "neq", "gt", "gte", "lt", "lte", "in", "notin"})
# spellings the official query parser can leave behind (vastai/api/query.py op_names all map to OPS)
_OP_ALIASES: Final = {"nin": "notin", "ne": "neq", "not in": "notin", "noteq": "neq"}


class QueryError(ValueError):
    """A query the real API refuses (400 invalid_args)."""


def _bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in {"true", "false", "1", "0"}:
        return value.strip().lower() in {"true", "1"}
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return None if math.isnan(number) else number
    return None


def _version_number(value: Any) -> float | None:
    """``driver_version`` "535.86.05" → 535086005, the CLI's own encoding (vastai/api/query.py)."""
    if isinstance(value, str) and value.count(".") == 2:
        try:
            major, minor, patch = (int(p) for p in value.split("."))
        except ValueError:
            return None
        return float(major * 1_000_000 + minor * 1_000 + patch)
    return _number(value)


def _equal(field: str, actual: Any, wanted: Any) -> bool:
    if wanted is None or actual is None:
        return actual is None and wanted is None
    if isinstance(actual, bool):
        return _bool(wanted) is actual
    if field == "driver_version":
        return _version_number(actual) == _version_number(wanted)
    if isinstance(actual, (int, float)):
        number = _number(wanted)
        return number is not None and math.isclose(float(actual), number, rel_tol=0, abs_tol=1e-9)
    if isinstance(actual, str):
        wanted_s = str(wanted)
        if field == "geolocation":
            return actual == wanted_s or actual.rsplit(", ", 1)[-1] == wanted_s
        return actual == wanted_s
    return bool(actual == wanted)


def _order(field: str, actual: Any, wanted: Any) -> int | None:
    """-1/0/1 comparing actual with wanted, or None when they are not comparable."""
    if actual is None or wanted is None:
        return None
    if field == "driver_version":
        a, w = _version_number(actual), _version_number(wanted)
    elif isinstance(actual, (int, float)):
        a, w = float(actual), _number(wanted)
    elif isinstance(actual, str):
        a_n, w_n = _number(actual), _number(wanted)
        if a_n is not None and w_n is not None:
            a, w = a_n, w_n
        else:
            sa, sw = actual, str(wanted)
            return (sa > sw) - (sa < sw)
    else:
        return None
    if a is None or w is None:
        return None
    return (a > w) - (a < w)


def condition_holds(field: str, actual: Any, op: str, wanted: Any) -> bool:
    op = _OP_ALIASES.get(op, op)
    if op == "eq":
        return _equal(field, actual, wanted)
    if op == "neq":
        return not _equal(field, actual, wanted)
    if op in {"in", "notin"}:
        values = wanted if isinstance(wanted, list) else [wanted]
        found = any(_equal(field, actual, v) for v in values)
        return found if op == "in" else not found
    cmp = _order(field, actual, wanted)
    if cmp is None:
        return False
    return {"gt": cmp > 0, "gte": cmp >= 0, "lt": cmp < 0, "lte": cmp <= 0}[op]


def parse_filters(raw: dict[str, Any], reserved: Iterable[str] = ()) -> list[tuple[str, str, Any]]:
    """``{"num_gpus":{"eq":"1"}, ...}`` → [(field, op, value)], skipping the reserved keys."""
    skip = set(reserved)
    out: list[tuple[str, str, Any]] = []
    for field, cond in raw.items():
        if field in skip:
            continue
        if isinstance(cond, dict):
            for op, value in cond.items():
                canonical = _OP_ALIASES.get(op, op)
                if canonical not in OPS:
                    raise QueryError(f"Unknown operator {op!r} for field {field!r}")
                out.append((field, canonical, value))
        else:
            # A bare value is an equality test.
            out.append((field, "eq", cond))
    return out


def row_matches(row: dict[str, Any], filters: Sequence[tuple[str, str, Any]]) -> bool:
    return all(condition_holds(f, row.get(f), op, v) for f, op, v in filters if f in row)


def parse_order(raw: Any) -> list[tuple[str, bool]]:
    """``[["score","desc"]]`` or ``[{"col":"id","dir":"asc"}]`` → [(field, descending)]."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise QueryError("order must be a list")
    keys: list[tuple[str, bool]] = []
    for item in raw:
        if isinstance(item, dict):
            field, direction = item.get("col"), item.get("dir", "asc")
        elif isinstance(item, (list, tuple)) and item:
            field, direction = item[0], item[1] if len(item) > 1 else "asc"
        elif isinstance(item, str):
            field, direction = item.rstrip("-+"), "desc" if item.endswith("-") else "asc"
        else:
            raise QueryError(f"bad order entry {item!r}")
        if not isinstance(field, str) or str(direction).lower() not in {"asc", "desc"}:
            raise QueryError(f"bad order entry {item!r}")
        keys.append((field, str(direction).lower() == "desc"))
    return keys


def sort_rows(rows: list[dict[str, Any]], order: Sequence[tuple[str, bool]]) -> list[dict[str, Any]]:
    """Stable multi-key sort; missing/None values last whatever the direction."""
    out = list(rows)
    for field, descending in reversed(order):
        present = [r for r in out if r.get(field) is not None]
        absent = [r for r in out if r.get(field) is None]

        def key(row: dict[str, Any], f: str = field) -> Any:
            value = row[f]
            number = _number(value) if not isinstance(value, str) else None
            return (0, number, "") if number is not None else (1, 0.0, str(value))

        present.sort(key=key, reverse=descending)
        out = present + absent
    return out
