"""Request/reply commands: ``offers``, ``logs`` (owners answer over the queue) and ``tunnel list|close|close-all``.

``tunnel`` manages the SSH tunnels on this machine that the keeper holds for ``hybridctl comfy`` (state in
``$HYBRIDCTL_HOME/tunnels.json``); with ``--node-front`` it asks the proxy about the node front's tunnels instead.
"""

from __future__ import annotations

import re
from dataclasses import asdict
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
from hybridctl.comfy.tunnels import (
    Tunnel,
    TunnelStore,
    alive,
    ensure_keeper,
    keeper_pid,
    port_free,
    wait_ports_free,
)
from hybridctl.commands import PROFILE_PATTERN, AsJson, build
from hybridctl.output import bounded, console, fail, print_json

Timeout = Annotated[
    float, typer.Option("--timeout", callback=bounded(0.5), help="seconds to wait for the owner's answer")
]

tunnel_app = typer.Typer(
    no_args_is_help=True,
    help="SSH tunnels on this machine (kept for `comfy`); --node-front: the node front's (owner: proxy).",
)
NodeFront = Annotated[bool, typer.Option("--node-front", help="the node front's tunnels (asks the proxy)")]


def offers(
    profile: Annotated[str, typer.Argument(help="workload profile, e.g. mlnode-v1")],
    limit: Annotated[int, typer.Option(callback=bounded(1, 100))] = 10,
    estimated_minutes: Annotated[float, typer.Option("--estimated-minutes", callback=bounded(1))] = 60.0,
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
    tail: Annotated[int, typer.Option(callback=bounded(1, 10000))] = 200,
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
def tunnel_list(node_front: NodeFront = False, timeout: Timeout = 10.0, as_json: AsJson = False) -> None:
    """This machine's tunnels: local port, instance, target, status, alive (--node-front: the node front's)."""
    if node_front:
        _node_front_list(timeout, as_json)
        return
    store = TunnelStore()
    tunnels = store.all()
    keeper = keeper_pid()
    if tunnels and keeper is None:
        keeper = ensure_keeper()  # tunnels recorded but no keeper (a reboot?): it re-opens them
    if as_json:
        print_json([{**asdict(t), "url": t.url, "alive": alive(t, keeper)} for t in tunnels])
        return
    if not tunnels:
        console.print(f"no local tunnels ({store.path})", highlight=False)
        return
    table = Table(title=f"local tunnels (keeper pid {keeper}, {store.path})")
    for col in ("port", "instance", "slot", "target", "status", "alive"):
        table.add_column(col)
    for t in tunnels:
        status = f"{t.status}: {t.error}" if t.error else t.status
        table.add_row(
            str(t.local_port), str(t.instance_id), t.label, t.target, status, "yes" if alive(t, keeper) else "no"
        )
    console.print(table)


def _node_front_list(timeout: float, as_json: bool) -> None:
    answer = ask(TunnelListQuery(), TunnelListReply, timeout=timeout, what="listing tunnels")
    if as_json:
        print_json(answer.tunnels)
        return
    if not answer.tunnels:
        console.print("no node-front tunnels")
        return
    table = Table(title="node-front tunnels")
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
    target: Annotated[str, typer.Argument(help="local port or instance id (--node-front: instance id)")],
    node_front: NodeFront = False,
    as_json: AsJson = False,
) -> None:
    """Close one tunnel, freeing its local port (the instance keeps running)."""
    if not target.isdigit():
        what = "instance id" if node_front else "local port or instance id"
        raise fail(f"invalid {what} {target!r}: a number")
    if node_front:
        payload = build(TunnelClose, instance_id=int(target))
        _published(payload.TYPE, publish(payload), f"closing the tunnel of instance {target}", as_json)
        return
    store = TunnelStore()
    tunnel = store.find(int(target))
    if tunnel is None or store.remove(tunnel.instance_id) is None:
        known = ", ".join(f"{t.local_port} (instance {t.instance_id})" for t in store.all()) or "none"
        raise fail(f"no local tunnel on port or for instance {target!r}; open: {known}", 1)
    _closed([tunnel], as_json)


@tunnel_app.command("close-all")
def tunnel_close_all(node_front: NodeFront = False, as_json: AsJson = False) -> None:
    """Close every tunnel on this machine (--node-front: every tunnel of the node front)."""
    if node_front:
        payload = build(TunnelClose, all=True)
        _published(payload.TYPE, publish(payload), "closing every tunnel", as_json)
        return
    _closed(TunnelStore().remove_all(), as_json)


def _closed(tunnels: list[Tunnel], as_json: bool) -> None:
    """The keeper notices the state file and closes the listeners; report once the ports are free."""
    ports = [t.local_port for t in tunnels]
    freed = wait_ports_free(ports, timeout=10)
    if as_json:
        print_json({"closed": [{"local_port": t.local_port, "instance_id": t.instance_id} for t in tunnels]})
    else:
        if not tunnels:
            console.print("no local tunnels to close")
        for t in tunnels:
            console.print(
                f"closed 127.0.0.1:{t.local_port} → instance {t.instance_id}; the instance keeps running "
                f"(`hybridctl comfy destroy {t.instance_id}` releases it)",
                highlight=False,
            )
    if not freed:
        busy = [p for p in ports if not port_free(p)]
        raise fail(f"local port(s) {busy} still in use after 10 s: is the keeper (pid {keeper_pid()}) stuck?", 1)


def _published(kind: str, message_id: str, summary: str, as_json: bool) -> None:
    if as_json:
        print_json({"published": kind, "id": message_id})
    else:
        console.print(f"published {kind} id={message_id}: {summary}", highlight=False)
