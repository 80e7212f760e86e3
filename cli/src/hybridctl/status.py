"""``hybridctl status``: the whole system read from the views each owner keeps in Redis (KEY_TABLE).

Read-only and tolerant: a key nobody has written yet shows as "not running"/absent, an unreadable value is skipped,
so status works on a half-started system and never needs a service to answer.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from hybrid_common.redis_keys import RedisKeys
from hybridctl.broker import settings
from hybridctl.output import console, fail, print_json

if TYPE_CHECKING:
    from redis.asyncio import Redis

SERVICES = ("scheduler", "provisioner", "proxy", "callback-relay")


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _json(raw: Any) -> Any:
    if raw is None:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


async def _hash_json(redis: Redis, key: str) -> dict[str, Any]:
    raw: dict[Any, Any] = await redis.hgetall(key)
    out = {_s(k): _json(v) for k, v in raw.items()}
    return {k: v for k, v in out.items() if v is not None}


async def _services(redis: Redis, keys: RedisKeys) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in SERVICES}
    async for key in redis.scan_iter(match=keys.status("*", "*"), count=200):
        name = _s(key)[len(keys.prefix) :].split(":")[1]
        beat = _json(await redis.get(key))
        instance = _s(key).rsplit(":", 1)[-1]
        out.setdefault(name, []).append({"instance": instance, **(beat if isinstance(beat, dict) else {})})
    # The scheduler keeps no heartbeat key: its leader lease (renewed at TTL/3) says it is alive.
    holder = await redis.get(keys.lease("scheduler"))
    if not out["scheduler"] and holder is not None:
        out["scheduler"].append({"instance": _s(holder), "leader": True})
    return out


def _relay(raw: dict[Any, Any]) -> tuple[dict[int, dict[str, int]], dict[str, int]]:
    """``relay:stats`` fields are ``<poc_start>:<node>:<counter>`` (callback-relay ledger)."""
    per_poc: dict[int, dict[str, int]] = {}
    totals: dict[str, int] = {}
    for field, value in raw.items():
        try:
            height, _node, counter = _s(field).split(":", 2)
            n = int(value)
        except ValueError:
            continue
        poc = per_poc.setdefault(int(height), {})
        poc[counter] = poc.get(counter, 0) + n
        totals[counter] = totals.get(counter, 0) + n
    return per_poc, totals


async def gather(redis: Redis, keys: RedisKeys) -> dict[str, Any]:
    """Everything status shows, as one JSON-ready dict."""
    now = time.time()
    chain_raw = _json(await redis.get(keys.chain_view()))
    view = chain_raw.get("view") if isinstance(chain_raw, dict) else None
    plan = _json(await redis.get(keys.scheduler("plan")))
    paused = _json(await redis.get(keys.scheduler("paused")))
    campaigns = await _hash_json(redis, keys.scheduler("epochs"))
    confirmation = _json(await redis.get(keys.scheduler("confirmation")))
    instances = await _hash_json(redis, keys.instances())
    tunnels = await _hash_json(redis, keys.tunnels())
    routes = await _hash_json(redis, keys.front_routes())
    proxy_node = _json(await redis.get(keys.proxy_node()))
    windows = await _hash_json(redis, keys.relay_windows())
    per_poc, relay_totals = _relay(await redis.hgetall(keys.relay_stats()))
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    spent_today = float(await redis.get(keys.spend_day(day)) or 0.0)

    # PoC start height → epoch, from the scheduler's campaigns and the relay's learned windows.
    epoch_of: dict[int, int] = {}
    for w in windows.values():
        if isinstance(w, dict) and "epoch_index" in w and isinstance(w.get("window"), dict):
            epoch_of[int(w["window"]["poc_start"])] = int(w["epoch_index"])
    for c in campaigns.values():
        window, idx = c.get("window"), c.get("epoch_index")
        if isinstance(window, dict) and idx is not None:
            epoch_of[int(window["poc_start"])] = int(idx)

    epochs: dict[int, dict[str, Any]] = {}

    def epoch(idx: int) -> dict[str, Any]:
        return epochs.setdefault(
            idx,
            {"index": idx, "weight": None, "gpu_minutes": 0.0, "cost_usd": 0.0, "batches_relayed": 0, "campaigns": []},
        )

    for key, c in sorted(campaigns.items(), key=lambda kv: kv[1].get("created_at", 0)):
        if c.get("epoch_index") is None:
            continue
        e = epoch(int(c["epoch_index"]))
        e["campaigns"].append({"key": key, "purpose": c.get("purpose"), "state": c.get("state")})
        if c.get("weight") is not None:
            e["weight"] = (e["weight"] or 0.0) + float(c["weight"])
    if view and view.get("epoch_index") is not None:
        epoch(int(view["epoch_index"]))  # every epoch seen is listed, even before anything was rented in it
    for idx in list(epochs):
        spend: dict[Any, Any] = await redis.hgetall(keys.spend_epoch(idx))
        if spend:
            e = epoch(idx)
            e["gpu_minutes"] = round(float(spend.get(b"gpu_seconds", 0)) / 60, 3)
            e["cost_usd"] = round(float(spend.get(b"usd", 0)), 6)
    for height, counts in per_poc.items():
        if height in epoch_of:
            epoch(epoch_of[height])["batches_relayed"] += counts.get("forwarded", 0)

    # Live instances: GPU minutes not yet finalised still count as billed for their epoch.
    for inst in instances.values():
        if inst.get("state") != "destroyed" and inst.get("epoch_index") is not None:
            e = epoch(int(inst["epoch_index"]))
            e["gpu_minutes"] = round(e["gpu_minutes"] + float(inst.get("gpu_seconds") or 0) / 60, 3)

    next_window = (plan or {}).get("next_window") if isinstance(plan, dict) else None
    next_poc: dict[str, Any] | None = None
    if isinstance(next_window, dict):
        at = (next_window.get("times") or {}).get("poc_start")
        next_poc = {
            "epoch_index": next_window.get("epoch_index"),
            "height": (next_window.get("heights") or {}).get("poc_start"),
            "at": at,
            "in_seconds": round(at - now, 1) if isinstance(at, int | float) else None,
        }
    live_instances = [i for i in instances.values() if i.get("state") != "destroyed"]
    return {
        "at": now,
        "chain": {
            "height": view.get("block_height") if view else None,
            "phase": view.get("phase") if view else None,
            "epoch_index": view.get("epoch_index") if view else None,
            "poc_v2_enabled": view.get("poc_v2_enabled") if view else None,
            "stale_seconds": chain_raw.get("stale_seconds") if isinstance(chain_raw, dict) else None,
        },
        "next_poc": next_poc,
        "plan": plan,
        "paused": paused is not None,
        "campaigns": sorted(campaigns.values(), key=lambda c: c.get("created_at", 0))[-8:],
        "epochs": [epochs[i] for i in sorted(epochs)],
        "instances": sorted(instances.values(), key=lambda i: int(i.get("instance_id") or 0)),
        "routes": routes,
        "tunnels": list(tunnels.values()),
        "proxy_node": proxy_node,
        "relay": {"totals": relay_totals, "per_poc": {str(h): c for h, c in sorted(per_poc.items())}},
        "confirmation": confirmation,
        "budget": {
            "spent_today_usd": round(spent_today, 6),
            "dph_now": round(sum(float(i.get("dph_total") or 0) for i in live_instances), 4),
        },
        "services": await _services(redis, keys),
    }


def _ago(ts: Any, now: float) -> str:
    return f"{now - ts:.0f}s ago" if isinstance(ts, int | float) else "-"


def render(data: dict[str, Any]) -> Group:
    now = data["at"]
    chain, nxt = data["chain"], data["next_poc"]
    head = Text()
    if chain["height"] is None:
        head.append("chain: not running (no chain:view from the scheduler)\n", style="yellow")
    else:
        head.append(f"chain: height {chain['height']}  epoch {chain['epoch_index']}  phase {chain['phase']}")
        head.append(f"  (view {chain['stale_seconds'] or 0:.0f}s old)\n")
    if nxt and nxt["height"] is not None:
        countdown = f"in {nxt['in_seconds']:.0f}s" if nxt["in_seconds"] is not None else ""
        head.append(f"next PoC: epoch {nxt['epoch_index']} at height {nxt['height']} {countdown}\n")
    plan = data["plan"] or {}
    campaign = plan.get("campaign") if isinstance(plan, dict) else None
    if campaign:
        head.append(
            f"plan: {campaign.get('key')} {campaign.get('state')} profile {campaign.get('profile')} "
            f"slots {campaign.get('slots')}\n"
        )
    elif not plan:
        head.append("plan: none (scheduler not running)\n", style="yellow")
    else:
        head.append("plan: nothing planned\n")
    if data["paused"]:
        head.append("scheduling PAUSED\n", style="bold red")
    budget = data["budget"]
    head.append(f"spend today ${budget['spent_today_usd']:.4f}  burning ${budget['dph_now']:.3f}/h\n")
    relay = data["relay"]["totals"]
    head.append(
        "relay: " + (", ".join(f"{k} {v}" for k, v in sorted(relay.items())) if relay else "no batches yet") + "\n"
    )
    conf = data["confirmation"]
    if isinstance(conf, dict):
        policy = conf.get("policy")
        head.append(
            f"confirmation PoC: policy {policy.get('mode') if isinstance(policy, dict) else policy}, "
            f"{len(conf.get('events') or [])} events seen, active {conf.get('active') or 'none'}\n"
        )
    node = data["proxy_node"]
    if isinstance(node, dict):
        shown = {k: node[k] for k in ("node_id", "state", "loaded_model", "last_error") if node.get(k)}
        head.append("proxy node: " + " ".join(f"{k}={v}" for k, v in shown.items()) + "\n")
    services = ", ".join(f"{n} {'x' + str(len(b)) if b else 'not running'}" for n, b in data["services"].items())
    head.append(f"services: {services}\n")

    inst = Table(title="instances", expand=False)
    for col in ("id", "slot", "epoch", "state", "gpu", "route", "$/h", "spend $", "created"):
        inst.add_column(col)
    for i in data["instances"]:
        route = i.get("route") or {}
        where = route.get("ssh_host") if route.get("connectivity") == "tunnel" else route.get("public_ip")
        inst.add_row(
            str(i.get("instance_id")),
            str(i.get("slot_id")),
            str(i.get("epoch_index")),
            str(i.get("state")),
            f"{i.get('num_gpus') or 1}x {i.get('gpu_name')}",
            f"{route.get('connectivity') or '-'} {where or ''}",
            f"{float(i.get('dph_total') or 0):.3f}",
            f"{float(i.get('cost_usd') or 0):.4f}",
            _ago(i.get("created_at"), now),
        )
    ep = Table(title="epochs")
    for col in ("epoch", "weight", "GPU min", "cost $", "batches relayed", "campaigns"):
        ep.add_column(col)
    for e in data["epochs"]:
        ep.add_row(
            str(e["index"]),
            "-" if e["weight"] is None else f"{e['weight']:g}",
            f"{e['gpu_minutes']:.2f}",
            f"{e['cost_usd']:.4f}",
            str(e["batches_relayed"]),
            ", ".join(f"{c['key']}:{c['state']}" for c in e["campaigns"]),
        )
    tun = Table(title="tunnels")
    for col in ("instance", "slot", "ssh", "state", "forwards"):
        tun.add_column(col)
    for t in data["tunnels"]:
        forwards = " ".join(f"{f.get('local_port')}→{f.get('remote_port')}" for f in t.get("forwards") or [])
        tun.add_row(
            str(t.get("instance_id")),
            str(t.get("slot_id")),
            f"{t.get('ssh_host')}:{t.get('ssh_port')}",
            str(t.get("state")),
            forwards,
        )
    slots = Table(title="slots (node front)")
    for col in ("slot", "state", "gateway poc/inference", "instance", "route", "why"):
        slots.add_column(col)
    for slot_id, r in sorted(data["routes"].items()):
        slots.add_row(
            slot_id,
            str(r.get("state")),
            f"{r.get('host')}:{r.get('gateway_poc_port')}/{r.get('gateway_inference_port')}",
            str(r.get("instance_id") or "-"),
            str(r.get("connectivity") or "-"),
            str(r.get("reason") or ""),
        )
    parts: list[Any] = [head, slots, inst, ep] if data["routes"] else [head, inst, ep]
    if data["tunnels"]:
        parts.append(tun)
    return Group(*parts)


def status(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="refresh live until Ctrl-C")] = False,
    interval: Annotated[float, typer.Option(help="seconds between refreshes with --watch (at least 0.2)")] = 2.0,
) -> None:
    """Chain, next PoC, plan, instances, spend, tunnels, relay counts, confirmation PoC and budget."""
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

    if not interval >= 0.2:  # checked here, not by typer's min=, so the error names the value given
        raise fail(f"--interval {interval:g}: the refresh interval must be at least 0.2 seconds")
    s = settings()
    keys = RedisKeys(s.namespace)

    async def once(redis: Redis) -> dict[str, Any]:
        try:
            return await gather(redis, keys)
        except (RedisError, OSError) as exc:
            raise fail(f"cannot read Redis at {s.redis_url.split('@')[-1]}: {exc}", 1) from None

    async def go() -> None:
        redis = Redis.from_url(s.redis_url, socket_connect_timeout=5, socket_timeout=10)
        try:
            if not watch:
                data = await once(redis)
                print_json(data) if as_json else console.print(render(data))
                return
            if as_json:  # one JSON document per line, for scripts following the system
                while True:
                    typer.echo(orjson.dumps(await once(redis), default=str).decode(), nl=True)
                    await asyncio.sleep(interval)
            with Live(render(await once(redis)), console=console, refresh_per_second=4) as live:
                while True:
                    await asyncio.sleep(interval)
                    live.update(render(await once(redis)))
        finally:
            await redis.aclose()

    try:
        asyncio.run(go())
    except KeyboardInterrupt:
        pass
