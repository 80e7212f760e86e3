"""The typer application: one module per command group; this file only wires them."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer
from rich.console import Console

from hybrid_common.bus import Publisher, Unroutable, connect
from hybrid_common.messages import REGISTRY, InvalidMessage
from hybrid_common.settings import CommonSettings
from hybrid_common.topology import Topology

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Operate gonka-hybrid: status and commands.")
console = Console()
err = Console(stderr=True)


@app.callback()
def _root() -> None:
    """gonka-hybrid operator commands (MODE, AMQP_URL, REDIS_URL from the environment or .env)."""


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


@app.command()
def publish(
    message_type: Annotated[str, typer.Argument(help="a command type from docs/messages.md, e.g. reconcile")],
    payload: Annotated[str, typer.Argument(help="the payload as JSON")] = "{}",
) -> None:
    """Publish any command from the catalogue (validated against its schema, mandatory routing)."""
    model = REGISTRY.get(message_type)
    if model is None or model.KIND != "command":
        names = ", ".join(t for t, m in REGISTRY.items() if m.KIND == "command")
        raise fail(f"unknown command type {message_type!r}; one of: {names}")
    try:
        body = model.model_validate(json.loads(payload))
    except (json.JSONDecodeError, ValueError) as exc:
        raise fail(f"invalid payload for {message_type!r}: {InvalidMessage(str(exc))}") from None
    settings = CommonSettings()

    async def go() -> str:
        conn = await connect(settings.amqp_url, name="hybridctl")
        try:
            env = await Publisher(conn, Topology(settings.namespace), "hybridctl", deadline=10).publish(body)
            return str(env.id)
        finally:
            await conn.close()

    try:
        message_id = asyncio.run(go())
    except Unroutable:
        raise fail(f"no service consumes {message_type!r} yet (is its owner running?)", 1) from None
    except OSError as exc:
        raise fail(f"cannot reach the broker at {settings.amqp_url.split('@')[-1]}: {exc}", 1) from None
    console.print(f"published {message_type} id={message_id}")
