"""Request/reply commands: ``offers``, ``logs`` and ``tunnel list|close|close-all`` (owners answer over the queue)."""

from __future__ import annotations

import re
from typing import Annotated

import typer
from rich.table import Table

from hybrid_common.messages.commands import (
    LogsQuery,
    LogsReply,
    OffersQuery,
    OffersReply,
    TunnelClose,
    TunnelListQuery,
    TunnelListReply,
)
from hybridctl.broker import ask, publish
from hybridctl.commands import PROFILE_PATTERN, AsJson, build
from hybridctl.output import console, fail, print_json

Timeout = Annotated[float, typer.Option("--timeout", min=0.5, help="seconds to wait for the owner's answer")]

tunnel_app = typer.Typer(no_args_is_help=True, help="The node front's SSH tunnels (owner: proxy).")


def offers(
    profile: Annotated[str, typer.Argument(help="workload profile, e.g. mlnode-v1")],
    limit: Annotated[int, typer.Option(min=1, max=100)] = 10,
    estimated_minutes: Annotated[float, typer.Option("--estimated-minutes", min=1)] = 60.0,
    timeout: Timeout = 20.0,
    as_json: AsJson = False,
) -> None:
    """A priced preview of the offers a profile would rent (rents nothing)."""
    if not re.match(PROFILE_PATTERN, profile):
        raise fail(f"invalid profile {profile!r}: lower-case letters, digits, '-' and '_'")
    query = build(OffersQuery, profile=profile, limit=limit, estimated_minutes=estimated_minutes)
    answer = ask(query, OffersReply, timeout=timeout, what=f"pricing offers for {profile}")
    if as_json:
        print_json(answer.model_dump(mode="json"))
        return
    table = Table(title=f"offers for {profile} ({estimated_minutes:g} min)")
    for col in ("offer", "machine", "gpu", "VRAM GB", "$/h", "est. $", "reliability", "down Mb/s", "ports", "where"):
        table.add_column(col)
    for o in answer.offers:
        table.add_row(
            str(o.offer_id),
            str(o.machine_id),
            f"{o.num_gpus}x {o.gpu_name}",
            f"{o.gpu_ram_mb / 1024:.0f}",
            f"{o.dph_total:.3f}",
            "-" if o.estimated_cost_usd is None else f"{o.estimated_cost_usd:.3f}",
            f"{o.reliability:.3f}",
            f"{o.inet_down_mbps:.0f}",
            str(o.direct_port_count),
            o.geolocation or "-",
        )
    console.print(table)
    if not answer.offers:
        console.print(f"no offer fits profile {profile} now")


def logs(
    instance: Annotated[str, typer.Argument(help="Vast.ai instance id")],
    tail: Annotated[int, typer.Option(min=1, max=10000)] = 200,
    timeout: Timeout = 30.0,
    as_json: AsJson = False,
) -> None:
    """The instance's container log tail (fetched by the provisioner)."""
    if not instance.isdigit():
        raise fail(f"invalid instance id {instance!r}: a Vast.ai instance id is a number")
    query = build(LogsQuery, instance_id=int(instance), tail=tail)
    answer = ask(query, LogsReply, timeout=timeout, what=f"fetching the logs of instance {instance}")
    if as_json:
        print_json(answer.model_dump(mode="json"))
    else:
        typer.echo(answer.text, nl=not answer.text.endswith("\n"))


@tunnel_app.command("list")
def tunnel_list(timeout: Timeout = 10.0, as_json: AsJson = False) -> None:
    """The node front's tunnels and their forwards."""
    answer = ask(TunnelListQuery(), TunnelListReply, timeout=timeout, what="listing tunnels")
    if as_json:
        print_json(answer.tunnels)
        return
    if not answer.tunnels:
        console.print("no tunnels")
        return
    table = Table(title="tunnels")
    for col in ("instance", "slot", "ssh", "state", "forwards"):
        table.add_column(col)
    for t in answer.tunnels:
        forwards = " ".join(f"{f.get('local_port')}→{f.get('remote_port')}" for f in t.get("forwards") or [])
        table.add_row(
            str(t.get("instance_id")),
            str(t.get("slot_id")),
            f"{t.get('ssh_host')}:{t.get('ssh_port')}",
            str(t.get("state")),
            forwards,
        )
    console.print(table)


@tunnel_app.command("close")
def tunnel_close(
    instance: Annotated[str, typer.Argument(help="instance id whose tunnel to close")], as_json: AsJson = False
) -> None:
    """Close one instance's tunnel."""
    if not instance.isdigit():
        raise fail(f"invalid instance id {instance!r}: a Vast.ai instance id is a number")
    payload = build(TunnelClose, instance_id=int(instance))
    _published(payload.TYPE, publish(payload), f"closing the tunnel of instance {instance}", as_json)


@tunnel_app.command("close-all")
def tunnel_close_all(as_json: AsJson = False) -> None:
    """Close every tunnel of the node front."""
    payload = build(TunnelClose, all=True)
    _published(payload.TYPE, publish(payload), "closing every tunnel", as_json)


def _published(kind: str, message_id: str, summary: str, as_json: bool) -> None:
    if as_json:
        print_json({"published": kind, "id": message_id})
    else:
        console.print(f"published {kind} id={message_id}: {summary}", highlight=False)
