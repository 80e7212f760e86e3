"""Commands published to the owners' queues: provision, release, destroy, reconcile, pause, resume, rehearse.

Money safety (issue #12, the seeds' ``--yes --estimated-minutes``): in ``MODE=live`` anything that rents asks for
confirmation showing the estimated cost, and refuses without a terminal unless ``--yes`` is given.
"""

from __future__ import annotations

import re
import sys
import uuid
from typing import Annotated

import typer
from pydantic import ValidationError

from hybrid_common.messages.base import Payload
from hybrid_common.messages.commands import (
    Destroy,
    PauseScheduling,
    Provision,
    Reconcile,
    Rehearse,
    Release,
    ResumeScheduling,
)
from hybrid_common.messages.domain import Purpose
from hybridctl.broker import publish, settings
from hybridctl.output import bounded, console, err, fail, print_json

PROFILE_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"

Yes = Annotated[bool, typer.Option("--yes", "-y", help="do not ask (MODE=live): you accept the estimated cost")]
Minutes = Annotated[
    float, typer.Option("--estimated-minutes", callback=bounded(1), help="how long the GPUs run, for the cost estimate")
]
AsJson = Annotated[bool, typer.Option("--json", help="machine-readable output")]


def _bad_values(exc: ValidationError, given: dict[str, object]) -> str:
    """Name the offending input value(s) from a message model's validation error."""
    parts = []
    for e in exc.errors():
        loc = [str(p) for p in e["loc"]]
        value = e.get("input")
        parts.append(f"{'.'.join(loc) or 'value'}={value!r}: {e['msg']}")
    return "; ".join(parts) or str(given)


def build(model: type[Payload], **fields: object) -> Payload:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise fail(f"invalid {model.TYPE}: {_bad_values(exc, fields)}") from None


def confirm_spend(what: str, gpus: int, minutes: float, yes: bool) -> None:
    """Ask before renting real GPUs. The estimate is an upper bound: every GPU at the price cap for ``minutes``."""
    s = settings()
    if s.mode != "live":
        return
    estimate = gpus * s.vastai_max_price * minutes / 60
    text = (
        f"{what}: MODE=live rents real GPUs. Estimated cost up to ${estimate:.2f} "
        f"({gpus} GPU(s) x ${s.vastai_max_price:.2f}/h cap x {minutes:g} min)."
    )
    if yes:
        err.print(text + " Confirmed with --yes.")
        return
    if not sys.stdin.isatty():
        raise fail(text + " Refusing without a terminal: pass --yes to accept.", 1)
    err.print(text)
    if not typer.confirm("Rent?", default=False):
        raise fail("cancelled by the operator", 1)


def _done(payload: Payload, message_id: str, as_json: bool, summary: str) -> None:
    if as_json:
        print_json({"published": payload.TYPE, "id": message_id, "payload": payload.model_dump(mode="json")})
    else:
        console.print(f"published {payload.TYPE} id={message_id}: {summary}", highlight=False)


def _slots(raw: str) -> list[str]:
    slots = [s.strip() for s in raw.split(",") if s.strip()]
    if not slots:
        raise fail(f"--slots {raw!r}: give at least one slot id, e.g. --slots gpu-1,gpu-2")
    return slots


def provision(
    profile: Annotated[str, typer.Argument(help="workload profile, e.g. mlnode-v1, mlnode-v2, comfyui")],
    slots: Annotated[str, typer.Option("--slots", help="comma-separated slot ids (the dapi node ids)")],
    epoch: Annotated[
        int | None, typer.Option("--epoch", callback=bounded(0), help="the epoch these GPUs serve")
    ] = None,
    purpose: Annotated[Purpose, typer.Option(help="why (poc, manual, rehearsal, ...)")] = Purpose.MANUAL,
    register: Annotated[bool, typer.Option(help="register the slots in the dapi once ready")] = True,
    yes: Yes = False,
    estimated_minutes: Minutes = 60.0,
    as_json: AsJson = False,
) -> None:
    """Rent GPUs for slots (the provisioner makes one durable job per slot)."""
    if not re.match(PROFILE_PATTERN, profile):
        raise fail(f"invalid profile {profile!r}: lower-case letters, digits, '-' and '_'")
    slot_ids = _slots(slots)
    payload = build(
        Provision,
        idempotency_key=f"cli-{uuid.uuid4()}",
        profile=profile,
        slot_ids=slot_ids,
        purpose=purpose,
        epoch_index=epoch,
        register_node=register,
    )
    confirm_spend(f"provision {profile} for {', '.join(slot_ids)}", len(slot_ids), estimated_minutes, yes)
    _done(payload, publish(payload), as_json, f"{profile} for {', '.join(slot_ids)}")


def release(
    slot_ids: Annotated[list[str], typer.Argument(help="slot ids to take out of the dapi and destroy")],
    how: Annotated[str, typer.Option(help="delete | disable (in the dapi)")] = "delete",
    epoch: Annotated[int | None, typer.Option("--epoch", callback=bounded(0))] = None,
    as_json: AsJson = False,
) -> None:
    """Deregister slots and destroy their instances."""
    if how not in {"delete", "disable"}:
        raise fail(f"--how {how!r}: one of delete, disable")
    payload = build(
        Release,
        idempotency_key=f"cli-{uuid.uuid4()}",
        slot_ids=slot_ids,
        how=how,
        epoch_index=epoch,
        reason="operator",
    )
    _done(payload, publish(payload), as_json, ", ".join(slot_ids))


def destroy(
    instance: Annotated[str | None, typer.Argument(help="Vast.ai instance id")] = None,
    all_labelled: Annotated[
        bool, typer.Option("--all-labelled", help="EMERGENCY: destroy every instance carrying our label prefix")
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Destroy one instance, or with --all-labelled every instance we rented."""
    if (instance is None) == (not all_labelled):
        raise fail("give an INSTANCE id or --all-labelled (exactly one)")
    instance_id: int | None = None
    if instance is not None:
        if not instance.isdigit():
            raise fail(f"invalid instance id {instance!r}: a Vast.ai instance id is a number")
        instance_id = int(instance)
    payload = build(Destroy, instance_id=instance_id, all_labelled=all_labelled, reason="operator")
    target = f"instance {instance_id}" if instance_id is not None else f"all '{settings().label_prefix}-' instances"
    _done(payload, publish(payload), as_json, target)


def reconcile(as_json: AsJson = False) -> None:
    """Run the orphan reconciler now."""
    payload = Reconcile(reason="operator")
    _done(payload, publish(payload), as_json, "orphan reconciliation requested")


def pause(as_json: AsJson = False) -> None:
    """Stop planning new rentals (what is running keeps running)."""
    payload = PauseScheduling(reason="operator")
    _done(payload, publish(payload), as_json, "scheduling paused")


def resume(as_json: AsJson = False) -> None:
    """Resume planning."""
    payload = ResumeScheduling(reason="operator")
    _done(payload, publish(payload), as_json, "scheduling resumed")


def rehearse(
    profile: Annotated[str | None, typer.Option(help="profile (default: the chain's PoC generation)")] = None,
    yes: Yes = False,
    estimated_minutes: Minutes = 30.0,
    as_json: AsJson = False,
) -> None:
    """One GPU through a full PoC cycle now, outside the schedule."""
    if profile is not None and not re.match(PROFILE_PATTERN, profile):
        raise fail(f"invalid profile {profile!r}: lower-case letters, digits, '-' and '_'")
    payload = build(Rehearse, profile=profile)
    confirm_spend("rehearsal", 1, estimated_minutes, yes)
    _done(payload, publish(payload), as_json, f"rehearsal with {profile or 'the default profile'}")
