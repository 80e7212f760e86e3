"""The typer application: one module per command group; this file only wires them."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Annotated

import typer
from pydantic import ValidationError

from hybrid_common.messages import REGISTRY, InvalidMessage
from hybrid_common.settings import CommonSettings
from hybridctl import check, commands, queries, status
from hybridctl.comfy.commands import comfy_app
from hybridctl.output import console, err, fail

__all__ = ["app", "console", "err", "fail"]

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Operate gonka-hybrid: status and commands.")
app.command()(status.status)
app.command()(commands.provision)
app.command()(commands.release)
app.command()(commands.destroy)
app.command()(commands.reconcile)
app.command()(commands.pause)
app.command()(commands.resume)
app.command()(commands.rehearse)
app.command()(queries.offers)
app.command()(queries.logs)
app.add_typer(queries.tunnel_app, name="tunnel")
app.command()(check.check)
app.add_typer(comfy_app, name="comfy")


@app.callback()
def _root() -> None:
    """gonka-hybrid operator commands (MODE, AMQP_URL, REDIS_URL from the environment or .env)."""
    # The CLI reports connection failures itself, naming the endpoint; the libraries' own log lines would repeat them.
    for name in ("aio_pika", "aiormq", "hybrid"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


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
        data = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise fail(f"payload {payload!r} is not JSON: {exc}") from None
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        # Name each bad field and the value given: the message alone ("Input should be ...") hides what was sent.
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or 'payload'}={e.get('input')!r}: {e['msg']}" for e in exc.errors()
        )
        raise fail(f"invalid payload for {message_type!r}: {problems}") from None
    except ValueError as exc:
        raise fail(f"invalid payload for {message_type!r}: {InvalidMessage(str(exc))}") from None
    from hybrid_common.bus import Publisher, Unroutable, connect
    from hybrid_common.topology import Topology

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
