"""``hybridctl check``: is everything in place to rent and be paid — without renting anything.

The seeds' ``--manager-only``: keys, Vast.ai credit, the SSH key, the dapi admin API, broker and Redis, the relay's
public reachability, and that the dapi hands the relay's URL to MLNodes as their PoC callback (README: the dapi
setting ``DAPI_API__POC_CALLBACK_URL``; callbacks sent elsewhere never reach the relay).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import typer
from rich.table import Table

from hybrid_common import port
from hybrid_common.settings import CommonSettings
from hybridctl.broker import settings
from hybridctl.commands import AsJson
from hybridctl.output import console, print_json

if TYPE_CHECKING:
    import httpx


@dataclass
class Result:
    name: str
    ok: bool
    detail: str
    required: bool = True


def relay_url(s: CommonSettings) -> str:
    return (s.relay_public_url or f"http://127.0.0.1:{port('relay.public')}").rstrip("/")


def _same_target(a: str, b: str) -> bool:
    """The callback base and the relay URL name the same host and port (paths may differ: the relay keeps them)."""
    pa, pb = urlsplit(a), urlsplit(b)
    default = {"http": 80, "https": 443}
    return (pa.hostname, pa.port or default.get(pa.scheme)) == (pb.hostname, pb.port or default.get(pb.scheme))


async def _broker(s: CommonSettings) -> Result:
    from hybrid_common.bus import connect

    try:
        conn = await asyncio.wait_for(connect(s.amqp_url, name="hybridctl-check", timeout=5), 8)
        await conn.close()
        return Result("broker", True, s.amqp_url.split("@")[-1])
    except Exception as exc:
        return Result("broker", False, f"{s.amqp_url.split('@')[-1]}: {exc!r}")


async def _redis(s: CommonSettings) -> Result:
    from redis.asyncio import Redis

    redis = Redis.from_url(s.redis_url, socket_connect_timeout=5, socket_timeout=5)
    try:
        await redis.ping()
        return Result("redis", True, s.redis_url.split("@")[-1])
    except Exception as exc:
        return Result("redis", False, f"{s.redis_url.split('@')[-1]}: {exc!r}")
    finally:
        await redis.aclose()


def _keys(s: CommonSettings) -> list[Result]:
    out = []
    for name in ("vastai_api_key", "hyperbolic_api_key"):
        present = getattr(s, name) is not None
        if s.mode == "sim":
            out.append(Result(name.upper(), True, "sim: the simulator's key is used", required=False))
        else:
            out.append(Result(name.upper(), present, "set" if present else "missing (required in MODE=live)"))
    return out


def _ssh_key(s: CommonSettings) -> Result:
    key = Path(s.ssh_key_path).expanduser()
    pub = key.with_name(key.name + ".pub")
    ok = key.is_file() and pub.is_file()
    detail = f"{key} and {pub.name} present" if ok else f"{key} or {pub.name} missing (SSH_KEY_PATH)"
    return Result("ssh key", ok, detail, required=s.mode == "live")


async def _credit(client: httpx.AsyncClient, s: CommonSettings) -> Result:
    import httpx

    try:
        key = s.secret("vastai_api_key")
    except ValueError as exc:
        return Result("vast credit", False, str(exc))
    try:
        r = await client.get(f"{s.vast_url}/api/v0/users/current/", headers={"Authorization": f"Bearer {key}"})
        if r.status_code != 200:
            return Result("vast credit", False, f"{s.vast_url}: HTTP {r.status_code}")
        credit = float(r.json().get("credit") or 0)
        return Result("vast credit", credit > 0, f"${credit:.2f} at {s.vast_url}")
    except (httpx.HTTPError, ValueError) as exc:
        return Result("vast credit", False, f"{s.vast_url}: {exc!r}")


async def _dapi_admin(client: httpx.AsyncClient, s: CommonSettings) -> tuple[Result, dict[str, Any] | None]:
    import httpx

    try:
        r = await client.get(f"{s.dapi_admin_url}/admin/v1/nodes")
        if r.status_code != 200:
            return Result("dapi admin API", False, f"{s.dapi_admin_url}/admin/v1/nodes: HTTP {r.status_code}"), None
        nodes = r.json()
        count = len(nodes) if isinstance(nodes, list) else "?"
        config = None
        c = await client.get(f"{s.dapi_admin_url}/admin/v1/config")
        if c.status_code == 200:
            config = c.json()
        return Result("dapi admin API", True, f"{s.dapi_admin_url}: {count} nodes"), config
    except (httpx.HTTPError, ValueError) as exc:
        return Result("dapi admin API", False, f"{s.dapi_admin_url}: {exc!r}"), None


async def _relay(client: httpx.AsyncClient, url: str) -> Result:
    import httpx

    try:
        r = await client.get(f"{url}/healthz")
        return Result("relay public URL", r.status_code == 200, f"{url}/healthz: HTTP {r.status_code}")
    except httpx.HTTPError as exc:
        return Result("relay public URL", False, f"{url}: {exc!r} (RELAY_PUBLIC_URL)")


def _callback(config: dict[str, Any] | None, url: str) -> Result:
    if config is None:
        return Result("dapi callback URL", False, "the dapi admin API gave no config (GET /admin/v1/config)")
    base = str((config.get("api") or {}).get("poc_callback_url") or "")
    if _same_target(base, url):
        return Result("dapi callback URL", True, f"{base} → the relay")
    return Result(
        "dapi callback URL", False, f"the dapi sends callbacks to {base or '(unset)'}, not to the relay at {url}"
    )


async def run_checks(s: CommonSettings) -> list[Result]:
    import httpx

    url = relay_url(s)
    async with httpx.AsyncClient(timeout=5) as client:
        broker, redis, credit, (admin, config), relay = await asyncio.gather(
            _broker(s), _redis(s), _credit(client, s), _dapi_admin(client, s), _relay(client, url)
        )
    return [broker, redis, *_keys(s), _ssh_key(s), credit, admin, relay, _callback(config, url)]


def check(as_json: AsJson = False) -> None:
    """Verify keys, credit, SSH key, dapi admin API, broker, Redis and the relay path — rents nothing."""
    s = settings()
    with console.status("checking…"):
        results = asyncio.run(run_checks(s))
    failed = [r for r in results if not r.ok and r.required]
    if as_json:
        print_json(
            {
                "mode": s.mode,
                "ok": not failed,
                "checks": [{"name": r.name, "ok": r.ok, "detail": r.detail, "required": r.required} for r in results],
            }
        )
    else:
        table = Table(title=f"check (MODE={s.mode})")
        for col in ("check", "result", "detail"):
            table.add_column(col)
        for r in results:
            mark = "[green]ok[/green]" if r.ok else ("[red]FAIL[/red]" if r.required else "[yellow]warn[/yellow]")
            table.add_row(r.name, mark, r.detail)
        console.print(table)
        console.print(
            "all checks passed"
            if not failed
            else f"{len(failed)} check(s) failed: " + ", ".join(r.name for r in failed)
        )
    if failed:
        raise typer.Exit(1)
