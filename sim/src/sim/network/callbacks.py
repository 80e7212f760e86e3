"""The dapi's PoC callback server (its port 9100; gonka-protocol.md §2, §7, §10).

v1 — ``POST /v1/poc-batches/generated|validated`` and the ``/mlnode/v1/...`` aliases: bad JSON is a
400, anything else a **200 with an empty body** even outside the window, because the dapi only queues a
chain transaction; the chain then rejects a batch that lands outside the exchange window
``[P+1, P+stage+exchange]`` (the transaction lands a block after arrival) or names an unknown node.
While ``poc_v2_enabled`` is on the v1 routes answer 503.

v2 — ``POST /v2/poc-batches[/<model id>]/generated|validated``: 503 outside the acceptance window
(PoCGenerate, or wind-down while the exchange window is open; a confirmation PoC's generation), 400 for
bad JSON, a wrong ``block_height``, an unknown ``node_id`` or bad base64; 200 empty otherwise. A
nonce already stored is skipped silently (a batch of only such nonces is recorded as a duplicate).

Every batch lands in :attr:`Chain.batches` with its arrival height and what became of it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web

from sim.mlnode.listener import GatedListener
from sim.network.chain import BatchEntry, Chain, EpochRecord
from sim.network.driver import NodeDriver
from sim.network.epochs import (
    CPOC_GENERATION,
    CPOC_VALIDATION,
    INFERENCE,
    POC_GENERATE,
    POC_GENERATE_WIND_DOWN,
    POC_VALIDATE,
    POC_VALIDATE_WIND_DOWN,
)
from sim.network.nodes import ManagedNode, NodeRegistry
from sim.network.params import NetworkParams

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(message: Any, status: int) -> web.Response:
    # The dapi's TransparentErrorHandler: always {"error": <message>}.
    return web.Response(body=orjson.dumps({"error": message}), status=status, content_type="application/json")


class _BadBody(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _bind(
    raw: bytes, ints: tuple[str, ...], int_lists: tuple[str, ...] = (), float_lists: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Decode like echo's Bind into a Go struct; a failure's message is echo's HTTPError message."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _BadBody(f"Syntax error: offset={getattr(exc, 'pos', 0) + 1}, error={exc}") from None
    if not isinstance(body, dict):
        raise _BadBody("Unmarshal type error: expected=struct, got=array, field=, offset=1")
    for name in ints:
        v = body.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise _BadBody(f"Unmarshal type error: expected=int64, got={type(v).__name__}, field={name}")
    for name in int_lists:
        v = body.get(name)
        if v is not None and (
            not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v)
        ):
            raise _BadBody(f"Unmarshal type error: expected=[]int64, got=array, field={name}")
    for name in float_lists:
        v = body.get(name)
        if v is not None and (
            not isinstance(v, list) or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
        ):
            raise _BadBody(f"Unmarshal type error: expected=[]float64, got=array, field={name}")
    return body


@dataclass
class _Arrival:
    """One callback as it arrived, before deciding what becomes of it."""

    kind: str  # generated | validated
    generation: str  # v1 | v2
    body: dict[str, Any]
    record: EpochRecord
    nonces: int
    confirmation: bool
    chain_height: int  # where the chain sees it: v1 transactions land a block after arrival
    model_id: str | None = None
    node_id: str | None = None
    sample: list[int] = field(default_factory=list)


class CallbackServer:
    def __init__(
        self, *, chain: Chain, registry: NodeRegistry, params: NetworkParams, driver: NodeDriver, host: str, port: int
    ) -> None:
        self.chain = chain
        self.registry = registry
        self.params = params
        self.driver = driver
        self.listener = GatedListener(self._app(), host=host, port=port)

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024**2, middlewares=[self._not_found])
        r = app.router
        for prefix in ("/v1/poc-batches", "/mlnode/v1/poc-batches"):
            r.add_post(f"{prefix}/generated", self.v1_generated)
            r.add_post(f"{prefix}/validated", self.v1_validated)
        r.add_post("/v2/poc-batches/generated", self.v2_generated)
        r.add_post("/v2/poc-batches/validated", self.v2_validated)
        r.add_post("/v2/poc-batches/{model_id}/generated", self.v2_generated)
        r.add_post("/v2/poc-batches/{model_id}/validated", self.v2_validated)
        return app

    @web.middleware
    async def _not_found(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return _error("Not Found", 404)
        except web.HTTPMethodNotAllowed:
            return _error("Method Not Allowed", 405)

    # --- shared bookkeeping ----------------------------------------------------------------

    def _log(self, a: _Arrival, status: str, reason: str, *, new_nonces: int = 0) -> None:
        block_height = a.body.get("block_height")
        node_num = a.body.get("node_id")
        self.chain.add_batch(
            BatchEntry(
                kind=a.kind,
                generation=a.generation,
                arrival_height=self.chain.height,
                chain_height=a.chain_height,
                block_height=block_height if isinstance(block_height, int) else None,
                node_num=node_num if isinstance(node_num, int) else None,
                node_id=a.node_id,
                nonces=a.nonces,
                new_nonces=new_nonces,
                status=status,
                reason=reason,
                epoch_index=a.record.index,
                confirmation=a.confirmation,
                model_id=a.model_id,
                public_key=str(a.body.get("public_key", "")),
                nonce_sample=a.sample,
            )
        )
        if a.node_id is None:
            return
        managed = self.registry.nodes.get(a.node_id)
        rec = a.record.nodes.get(a.node_id) if managed is None else a.record.node(managed)
        if rec is None:
            return
        (rec.generated if a.kind == "generated" else rec.validated)[status] += 1
        if a.kind == "generated" and status == "accepted":
            if a.confirmation:
                rec.confirmation_nonces += new_nonces
            else:
                rec.nonces_accepted += new_nonces

    def _store(self, record: EpochRecord, stage: int, node_id: str, nonces: list[int]) -> int:
        stored = record.nonces.setdefault(stage, {}).setdefault(node_id, set())
        before = len(stored)
        stored.update(nonces)
        return len(stored) - before

    def _stage_for(self, stage_height: Any) -> tuple[EpochRecord, bool, bool]:
        """(epoch record, is the active confirmation PoC, is a known stage height)."""
        event = self.chain.active_event
        if event is not None and stage_height == event.trigger_height:
            return self.chain.record_of(event), True, True
        if isinstance(stage_height, int):
            rec = self.chain.record_for_stage(stage_height)
            if rec is not None:
                return rec, False, True
        return self.chain.latest, False, False

    def _node(self, body: dict[str, Any]) -> ManagedNode | None:
        num = body.get("node_id")
        return self.registry.by_num(num) if isinstance(num, int) and not isinstance(num, bool) else None

    @staticmethod
    def _digest(*parts: Any) -> str:
        return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()

    # --- v1 --------------------------------------------------------------------------------

    async def v1_generated(self, request: web.Request) -> web.Response:
        if self.params.poc_v2_enabled:
            return _error("PoC v1 callbacks are disabled while poc_v2_enabled is set", 503)
        try:
            body = _bind(await request.read(), ("block_height", "node_id"), ("nonces",), ("dist",))
        except _BadBody as exc:
            return _error({"message": exc.message}, 400)
        nonces = [int(n) for n in body.get("nonces") or []]
        stage = body.get("block_height")
        inclusion = self.chain.height + 1  # the queued transaction lands in the next block
        record, confirmation, known = self._stage_for(stage)
        node = self._node(body)
        a = _Arrival(
            "generated",
            "v1",
            body,
            record,
            len(nonces),
            confirmation,
            inclusion,
            node_id=node.config.id if node else None,
            sample=nonces[:3],
        )
        event = self.chain.active_event
        ctx = self.chain.context()
        if not known or not isinstance(stage, int):
            self._log(a, "rejected", f"block_height {stage} is not a PoC stage start")
            return web.Response(status=200)
        if confirmation and event is not None:
            in_window = event.in_batch_window(inclusion, self.params.epoch)
        else:  # a stage of an earlier epoch can only be late
            in_window = record.index == ctx.index and ctx.in_exchange_window(inclusion)
        if not in_window:
            self._log(a, "out_of_window", "outside the PoC exchange window")
            return web.Response(status=200)
        if node is None:
            self._log(a, "rejected", f"unknown node id {body.get('node_id')}")
            return web.Response(status=200)
        if self.chain.seen_before(self._digest("v1g", node.node_num, stage, sorted(nonces))):
            self._log(a, "duplicate", "same batch already submitted")
            return web.Response(status=200)
        new = self._store(record, stage, node.config.id, nonces)
        self._log(a, "accepted", "", new_nonces=new)
        return web.Response(status=200)

    async def v1_validated(self, request: web.Request) -> web.Response:
        if self.params.poc_v2_enabled:
            return _error("PoC v1 callbacks are disabled while poc_v2_enabled is set", 503)
        try:
            body = _bind(
                await request.read(), ("block_height", "node_id", "n_invalid"), ("nonces",), ("dist", "received_dist")
            )
        except _BadBody as exc:
            return _error({"message": exc.message}, 400)
        stage = body.get("block_height")
        inclusion = self.chain.height + 1
        record, confirmation, _known = self._stage_for(stage)
        validator = record.validator_keys.get(str(body.get("public_key", "")))
        a = _Arrival(
            "validated", "v1", body, record, len(body.get("nonces") or []), confirmation, inclusion, node_id=validator
        )
        event = self.chain.active_event
        p = self.params.epoch
        if confirmation and event is not None:
            in_window = event.validation_start(p) <= inclusion <= event.validation_end(p) + 1
        else:
            ctx = self.chain.context()
            in_window = record.index == ctx.index and ctx.in_validation_exchange_window(inclusion)
        if not in_window:
            self._log(a, "out_of_window", "outside the validation exchange window")
            return web.Response(status=200)
        if self.chain.seen_before(self._digest("v1v", body.get("public_key"), stage, body.get("nonces"))):
            self._log(a, "duplicate", "same validation already submitted")
            return web.Response(status=200)
        self._log(a, "accepted", "")
        return web.Response(status=200)

    # --- v2 --------------------------------------------------------------------------------

    def _model_from_path(self, request: web.Request) -> str | None:
        raw = request.match_info.get("model_id")
        return unquote(raw) if raw is not None else None  # the router decoded once, the dapi once more

    def _generation_stages(self) -> dict[int, bool]:
        """The stage heights whose generated artifacts are taken now → whether it is the confirmation PoC.

        The epoch's PoC while it generates (or winds down inside the exchange window); an active confirmation
        PoC from G to its exchange end. The event belongs to the epoch that triggered it, so its window holds
        even after a late manual trigger has run it into the next epoch's PoC (gonka-protocol.md §8)."""
        ctx = self.chain.context()
        h = self.chain.height
        phase = ctx.phase(h)
        stages: dict[int, bool] = {}
        if phase == POC_GENERATE or (phase == POC_GENERATE_WIND_DOWN and ctx.in_exchange_window(h)):
            stages[ctx.poc_start] = False
        event = self.chain.active_event
        if event is not None and event.phase == CPOC_GENERATION and event.in_batch_window(h, self.params.epoch):
            stages[event.trigger_height] = True
        return stages

    async def v2_generated(self, request: web.Request) -> web.Response:
        model_id = self._model_from_path(request)
        try:
            body = _bind(await request.read(), ("block_height", "node_id"))
        except _BadBody as exc:
            return _error({"message": exc.message}, 400)
        artifacts = body.get("artifacts") or []
        if not isinstance(artifacts, list):
            return _error(
                {"message": "Unmarshal type error: expected=[]mlnodeclient.ArtifactV2, got=object, field=artifacts"},
                400,
            )
        stages = self._generation_stages()
        stage = body.get("block_height")
        confirmation = isinstance(stage, int) and stages.get(stage, False)
        event = self.chain.active_event
        record = self.chain.record_of(event) if confirmation and event is not None else self.chain.latest
        node = self._node(body)
        a = _Arrival(
            "generated",
            "v2",
            body,
            record,
            len(artifacts),
            confirmation,
            self.chain.height,
            model_id=model_id,
            node_id=node.config.id if node else None,
            sample=[x["nonce"] for x in artifacts[:3] if isinstance(x, dict) and isinstance(x.get("nonce"), int)],
        )
        if not stages:
            self._log(a, "out_of_window", "503: not in PoC generate phase")
            return _error("not in PoC generate phase", 503)
        if not isinstance(stage, int) or stage not in stages:
            self._log(a, "rejected", "400: block_height is not the active PoC stage")
            return _error("block_height is not the active PoC stage", 400)
        if node is None:
            self._log(a, "rejected", "400: unknown node_num")
            return _error("unknown node_num", 400)
        nonces: list[int] = []
        for item in artifacts:
            nonce = item.get("nonce") if isinstance(item, dict) else None
            if not isinstance(nonce, int) or isinstance(nonce, bool):
                return _error(
                    {"message": "Unmarshal type error: expected=int64, got=string, field=artifacts.nonce"}, 400
                )
            try:
                vector = base64.b64decode(str(item.get("vector_b64", "")), validate=True)
            except (binascii.Error, ValueError):
                self._log(a, "rejected", "400: invalid base64 in artifact vector")
                return _error("invalid base64 in artifact vector", 400)
            if not vector:
                self._log(a, "rejected", "400: empty artifact vector")
                return _error("empty artifact vector", 400)
            nonces.append(nonce)
        if model_id is not None and model_id != self.params.poc_model:
            # The dapi stores it under that model; the chain has no such PoC model: it never counts.
            self._log(a, "rejected", f"model {model_id!r} is not the PoC model")
            return web.Response(status=200)
        if not self.params.poc_v2_enabled and not confirmation:
            self._log(a, "rejected", "chain: V2 disabled when poc_v2_enabled=false")
            return web.Response(status=200)
        new = self._store(a.record, stage, node.config.id, nonces)
        if new > 0 or not nonces:
            self._log(a, "accepted", "", new_nonces=new)
        else:
            self._log(a, "duplicate", "every nonce already stored")
        return web.Response(status=200)

    async def v2_validated(self, request: web.Request) -> web.Response:
        model_id = self._model_from_path(request)
        try:
            body = _bind(await request.read(), ("block_height", "node_id", "n_total", "n_mismatch"))
        except _BadBody as exc:
            return _error({"message": exc.message}, 400)
        ctx = self.chain.context()
        phase = ctx.phase(self.chain.height)
        event = self.chain.active_event
        confirmation = (
            event is not None
            and event.phase == CPOC_VALIDATION
            # In the inference phase the dapi takes any validation while the event validates; once a late event
            # has run into the next epoch's PoC, those naming its trigger height are still its (§8).
            and (phase == INFERENCE or body.get("block_height") == event.trigger_height)
        )
        open_ = phase in (POC_VALIDATE, POC_VALIDATE_WIND_DOWN) or confirmation
        record = self.chain.record_of(event) if confirmation and event is not None else self.chain.latest
        request_id = body.get("request_id")
        validator = self.driver.pending_validations.get(str(request_id)) or record.validator_keys.get(
            str(body.get("public_key", ""))
        )
        n_total = body.get("n_total")
        a = _Arrival(
            "validated",
            "v2",
            body,
            record,
            n_total if isinstance(n_total, int) else 0,
            confirmation,
            self.chain.height,
            model_id=model_id,
            node_id=validator,
        )
        if not open_:
            self._log(a, "out_of_window", "503: not in PoC validate phase")
            return _error("not in PoC validate phase", 503)
        if self.chain.seen_before(self._digest("v2v", request_id, body.get("public_key"), body.get("block_height"))):
            self._log(a, "duplicate", "same validation already submitted")
            return web.Response(status=200)
        self._log(a, "accepted", "")
        return web.Response(status=200)
