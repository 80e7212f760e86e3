"""JSON as the real components emit it.

* The dapi marshals chain protobuf types with Go's ``encoding/json``: gogoproto tags every scalar
  ``omitempty``, so zero values vanish (``poc_exchange_duration: 0`` after v0.2.10 is simply absent,
  ``event_sequence`` 0 of the first confirmation PoC too), enums are numbers, int64 are numbers.
* Chain REST (the Cosmos gRPC gateway) prints every field, int64/uint64 as **strings**, int32 and
  enums as numbers, and ``Decimal{value,exponent}`` with value as a string (gonka-protocol.md §5).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any


def omit_empty(obj: dict[str, Any]) -> dict[str, Any]:
    """Go omitempty on one struct level: drop false, 0, "", None and empty collections."""
    return {k: v for k, v in obj.items() if v not in (None, "", 0, False) and v != [] and v != {}}


def proto_decimal(value: float | int) -> dict[str, Any]:
    """A chain ``Decimal`` for the dapi's Go JSON: ``{value, exponent}`` with value a number."""
    d = Decimal(str(value)).normalize()
    sign, digits, exponent = d.as_tuple()
    assert isinstance(exponent, int)
    mantissa = int("".join(map(str, digits)) or "0") * (-1 if sign else 1)
    return {"value": mantissa, "exponent": exponent}


def rest_decimal(value: float | int) -> dict[str, Any]:
    d = proto_decimal(value)
    return {"value": str(d["value"]), "exponent": d["exponent"]}


def int64_strings(obj: dict[str, Any], *, keep_numbers: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The gateway's rendering of a flat message: ints as strings except int32/enum fields named."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(v, bool) or k in keep_numbers:
            out[k] = v
        elif isinstance(v, int):
            out[k] = str(v)
        elif isinstance(v, dict):
            out[k] = int64_strings(v, keep_numbers=keep_numbers)
        else:
            out[k] = v
    return out
