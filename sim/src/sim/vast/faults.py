"""Injectable faults: the ways Vast.ai goes wrong, armed through ``POST /_sim/faults``.

Each fault has a ``kind``, optional matchers (``offer_id``, ``instance_id``, ``machine_id``, ``image``,
``label``, ``route`` — a trailing ``*`` matches a prefix) and a ``count`` (default 1; ``null`` = until
cleared). Kinds and what they do (vastai-api.md "Failure signatures", architecture.md "Failure is normal"):

- ``offer_gone`` — the offer vanishes between search and create: the create answers 404 ``no_such_ask``
  (``status: 410`` for the "no longer available" form) and the offer is no longer rentable.
- ``create_leaves_instance`` — the create answers ``success:false`` **with** ``new_contract``
  (``status`` default 200): the instance exists, stopped, billing storage.
- ``pull_failure`` — the image never pulls: ``actual_status`` stays ``created``, the manifest ``status_msg``.
- ``oci_failure`` — the pull works, the container does not start: ``OCI runtime create failed`` in ``status_msg``.
- ``stuck_loading`` — the instance stays ``loading`` forever.
- ``host_offline`` — at ``at`` (epoch seconds) or ``after`` (wall seconds from now; default now) the host of
  ``instance_id`` / ``machine_id`` disappears: ``actual_status`` ``offline``, its ports and SSH stop answering.
- ``gpu_taken`` — the next start of a stopped instance finds its GPU rented by someone else.
- ``outbid`` — an interruptible instance is outbid now: ``cur_state == intended_status == next_state == "stopped"``.
- ``http_error`` — the next ``count`` calls of ``route`` (any when unset; one of ``search``, ``create``,
  ``show``, ``list``, ``destroy``, ``manage`` (start/stop/label/reboot), ``logs``, ``ssh``, ``keys``,
  ``user``, ``filters``, ``gpu_names``, ``gpu_types``) answer ``status`` (default 500) with a ``body`` of
  ``json`` (default), ``html`` (default for 502/504: the gateway's page) or ``text``.
- ``search_quota`` — searches answer the daily-quota 429 ``{"error":"search_quota_exceeded"}``.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any, Final

KINDS: Final = frozenset(
    {
        "offer_gone",
        "create_leaves_instance",
        "pull_failure",
        "oci_failure",
        "stuck_loading",
        "host_offline",
        "gpu_taken",
        "outbid",
        "http_error",
        "search_quota",
    }
)
_MATCHERS: Final = ("offer_id", "instance_id", "machine_id", "image", "label", "route")


@dataclass
class Fault:
    id: int
    kind: str
    count: int | None = 1
    offer_id: int | None = None
    instance_id: int | None = None
    machine_id: int | None = None
    image: str | None = None
    label: str | None = None
    route: str | None = None
    status: int | None = None
    body: str | None = None
    at: float | None = None
    after: float | None = None
    fired: int = 0

    def matches(self, context: dict[str, Any]) -> bool:
        for name in _MATCHERS:
            wanted = getattr(self, name)
            if wanted is None or wanted == "*":
                continue
            actual = context.get(name)
            if isinstance(wanted, str) and wanted.endswith("*"):
                if not isinstance(actual, str) or not actual.startswith(wanted[:-1]):
                    return False
            elif actual != wanted:
                return False
        return True

    @property
    def spent(self) -> bool:
        return self.count is not None and self.fired >= self.count

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class FaultBook:
    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._ids = itertools.count(1)

    def add(self, spec: dict[str, Any]) -> Fault:
        if not isinstance(spec, dict):
            raise ValueError("a fault is a JSON object")
        kind = spec.get("kind")
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {sorted(KINDS)}")
        unknown = set(spec) - {f for f in Fault.__dataclass_fields__ if f not in {"id", "fired"}}
        if unknown:
            raise ValueError(f"unknown fault fields {sorted(unknown)}")
        fault = Fault(id=next(self._ids), **spec)
        if fault.count is not None and (not isinstance(fault.count, int) or fault.count < 1):
            raise ValueError("count must be a positive integer or null")
        if fault.kind in {"host_offline", "outbid"} and fault.instance_id is None and fault.machine_id is None:
            raise ValueError(f"{fault.kind} needs instance_id or machine_id")
        if fault.status is not None and not (isinstance(fault.status, int) and 100 <= fault.status <= 599):
            raise ValueError("status must be an HTTP status code")
        if fault.body is not None and fault.body not in {"json", "html", "text"}:
            raise ValueError("body must be json, html or text")
        self._faults.append(fault)
        return fault

    def take(self, kind: str, **context: Any) -> Fault | None:
        """The first armed fault of ``kind`` matching ``context``, counted as fired."""
        for fault in self._faults:
            if fault.kind == kind and not fault.spent and fault.matches(context):
                fault.fired += 1
                return fault
        return None

    def all(self) -> list[Fault]:
        return list(self._faults)

    def remove(self, fault_id: int) -> bool:
        before = len(self._faults)
        self._faults = [f for f in self._faults if f.id != fault_id]
        return len(self._faults) != before

    def clear(self) -> None:
        self._faults.clear()
