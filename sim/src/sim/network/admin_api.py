"""The dapi's admin API (port 9200): ``/admin/v1/nodes`` and ``/admin/v1/config`` (gonka-protocol.md §3).

Quirks kept from the real handlers: errors are ``{"error": <message>}``; a failed create is a 400
``failed to create node: validation failed: ...`` but a failed *update* of an existing id is a 500
``failed to update node: ...``; a non-governance model on create gives the broker's vague "one or more
models are not valid governance models"; ``PUT /nodes/:id`` ignores the id in the path; ``POST
/nodes/batch`` registers every item as new (an existing id gets a new ``node_num``) and answers 201, 206
(some failed, ``{nodes, errors}``) or 400 (all failed, the error object nested under ``error``);
``DELETE`` waits for the node's in-flight command and answers ``true``/``false``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from sim.network.nodes import BindError, ManagedNode, NodeConfig, validate

if TYPE_CHECKING:
    from sim.network.dapi import Dapi

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(message: Any, status: int) -> web.Response:
    return _json({"error": message}, status)


class _HTTPError(Exception):
    """echo.HTTPError: formats as ``code=N, message=...`` when wrapped into another message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def go_string(self) -> str:
        return f"code={self.status}, message={self.message}"


class AdminRoutes:
    def __init__(self, dapi: Dapi) -> None:
        self.dapi = dapi

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024**2, middlewares=[self._errors])
        r = app.router
        r.add_post("/admin/v1/nodes", self.upsert)
        r.add_post("/admin/v1/nodes/batch", self.batch)
        r.add_put("/admin/v1/nodes/{id}", self.upsert)
        r.add_get("/admin/v1/nodes", self.list_nodes)
        r.add_delete("/admin/v1/nodes/{id}", self.delete)
        r.add_post("/admin/v1/nodes/{id}/enable", self.enable)
        r.add_post("/admin/v1/nodes/{id}/disable", self.disable)
        r.add_get("/admin/v1/config", self.config)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except _HTTPError as exc:
            return _error(exc.message, exc.status)
        except web.HTTPNotFound:
            return _error("Not Found", 404)
        except web.HTTPMethodNotAllowed:
            return _error("Method Not Allowed", 405)

    # --- helpers ---------------------------------------------------------------------------

    @staticmethod
    async def _read_json(request: web.Request) -> Any:
        raw = await request.read()
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _HTTPError(
                400,
                f"invalid request body: code=400, message=Syntax error: offset={getattr(exc, 'pos', 0) + 1}, error={exc}",
            ) from None

    def _bind(self, raw: Any) -> NodeConfig:
        try:
            return NodeConfig.bind(raw)
        except BindError as exc:
            raise _HTTPError(400, f"invalid request body: {exc}") from None

    def _bad_models(self, cfg: NodeConfig) -> list[str]:
        governance = set(self.dapi.params.governance_models)
        return [m for m in cfg.models if m not in governance]

    def _add(self, cfg: NodeConfig) -> NodeConfig:
        dapi = self.dapi
        errors = validate(cfg, dapi.registry.nodes)
        if errors:
            raise _HTTPError(400, "failed to create node: validation failed: " + "; ".join(errors))
        if self._bad_models(cfg):
            raise _HTTPError(
                400,
                "failed to create node: one or more models are not valid governance models. Check logs for details.",
            )
        node = dapi.registry.add(cfg, height=dapi.chain.height, epoch=dapi.chain.latest.index)
        dapi.chain.latest.node(node)
        return cfg

    # --- routes ----------------------------------------------------------------------------

    async def upsert(self, request: web.Request) -> web.Response:
        dapi = self.dapi
        cfg = self._bind(await self._read_json(request))
        existing = dapi.registry.nodes.get(cfg.id) if cfg.id else None
        if existing is None:
            return _json(self._add(cfg).as_config_json())
        errors = validate(cfg, dapi.registry.nodes, exclude_id=cfg.id)
        if errors:
            raise _HTTPError(500, "failed to update node: validation failed: " + "; ".join(errors))
        if bad := self._bad_models(cfg):
            raise _HTTPError(500, f"failed to update node: model {bad[0]} is not a valid governance model")
        node = dapi.registry.update(cfg, height=dapi.chain.height)
        rec = dapi.chain.latest.node(node)
        if dapi.chain.height not in rec.upserted_at_heights:
            rec.upserted_at_heights.append(dapi.chain.height)
        return _json(cfg.as_config_json())

    async def batch(self, request: web.Request) -> web.Response:
        raw = await self._read_json(request)
        if raw is not None and not isinstance(raw, list):
            raise _HTTPError(
                400,
                "invalid request body: code=400, message=Unmarshal type error: expected=[]apiconfig.InferenceNodeConfig, got=object, field=, offset=1",
            )
        configs = [self._bind(item) for item in raw or []]
        created: list[dict[str, Any]] = []
        errors: list[str] = []
        for i, cfg in enumerate(configs):
            try:
                created.append(self._add(cfg).as_config_json())
            except _HTTPError as exc:
                errors.append(f"node[{i}] (id: {cfg.id}): {exc.go_string()}")
        if errors and not created:
            return _error({"error": "all nodes failed validation", "errors": errors}, 400)
        if errors:
            return _json({"nodes": created, "errors": errors}, 206)
        return _json(created or None, 201)

    async def list_nodes(self, request: web.Request) -> web.Response:
        nodes = sorted(self.dapi.registry.nodes.values(), key=lambda n: n.node_num)
        return _json([n.as_response() for n in nodes])

    async def delete(self, request: web.Request) -> web.Response:
        dapi = self.dapi
        node_id = request.match_info["id"]
        node: ManagedNode | None = dapi.registry.nodes.get(node_id)
        if node is None:
            return _json(False)
        # The real handler blocks until the node's in-flight command finishes (up to 15 min).
        try:
            await asyncio.wait_for(node.lock.acquire(), timeout=dapi.client.command_timeout)
            locked = True
        except TimeoutError:
            locked = False
        try:
            if dapi.registry.nodes.get(node_id) is not node:
                return _json(False)
            dapi.registry.remove(node_id, height=dapi.chain.height)
            rec = dapi.chain.latest.nodes.get(node_id)
            if rec is not None and rec.node_num == node.node_num:
                rec.deleted_at_height = dapi.chain.height
            return _json(True)
        finally:
            if locked:
                node.lock.release()

    async def _set_admin(self, request: web.Request, enabled: bool) -> web.Response:
        dapi = self.dapi
        node_id = request.match_info["id"]
        node = dapi.registry.nodes.get(node_id)
        if node is None:
            return _error(f"node not found: {node_id}", 404)
        node.status.admin_enabled = enabled
        node.status.admin_epoch = dapi.chain.latest.index
        rec = dapi.chain.latest.node(node)
        rec.admin_epoch = node.status.admin_epoch
        word = "enabled" if enabled else "disabled"
        return _json({"message": f"node {word} successfully", "node_id": node_id})

    async def enable(self, request: web.Request) -> web.Response:
        return await self._set_admin(request, True)

    async def disable(self, request: web.Request) -> web.Response:
        return await self._set_admin(request, False)

    async def config(self, request: web.Request) -> web.Response:
        dapi = self.dapi
        p = dapi.params
        body = {
            "api": {
                "port": 9000,
                "poc_callback_url": p.callback_base,
                "ml_grpc_callback_address": "",
                "public_url": dapi.public_url,
                "public_server_port": dapi.public_port,
                "ml_server_port": dapi.callback_port,
                "admin_server_port": dapi.admin_port,
                "ml_grpc_server_port": 0,
                "test_mode": False,
            },
            "nodes": [
                n.config.as_config_json() for n in sorted(dapi.registry.nodes.values(), key=lambda n: n.node_num)
            ],
            "merged_node_config": True,
            "chain_node": {
                "url": f"{dapi.public_url}/chain-rpc",
                "is_genesis": False,
                "seed_api_url": dapi.public_url,
                "account_public_key": p.participant_public_key,
                "signer_key_name": "gonka-sim",
                "keyring_backend": "test",
                "keyring_dir": "/root/.inference",
            },
            "current_height": dapi.chain.height,
            "last_processed_height": dapi.chain.height,
            "current_node_version": p.mlnode_version,
            "last_used_version": p.mlnode_version,
        }
        # echo's JSONPretty with two-space indent.
        return web.Response(body=orjson.dumps(body, option=orjson.OPT_INDENT_2), content_type="application/json")
