"""The simulated network node: chain clock, public API, admin API, callback server, driver, traffic."""

from __future__ import annotations

import logging
import time
from typing import Any

import aiohttp
from aiohttp import web

from hybrid_common import EpochShape, TimeProfile, current_profile
from sim.mlnode.listener import GatedListener
from sim.network.admin_api import AdminRoutes
from sim.network.callbacks import CallbackServer
from sim.network.chain import Chain
from sim.network.clock import BlockClock
from sim.network.confirmation import ConfirmationPoC
from sim.network.driver import NodeDriver
from sim.network.inference_traffic import InferenceTraffic
from sim.network.node_client import NodeClient
from sim.network.nodes import NodeRegistry
from sim.network.params import DEFAULT_EPOCH_MODEL, DEFAULT_POC_MODEL, EpochParams, NetworkParams
from sim.network.public_api import PublicRoutes
from sim.network.report import build_report
from sim.network.scheduler import BlockScheduler
from sim.network.sim_api import SimRoutes

log = logging.getLogger(__name__)


class Dapi:
    def __init__(
        self,
        *,
        host: str,
        public_port: int,
        admin_port: int,
        callback_port: int,
        profile: TimeProfile,
        callback_base: str | None,
        poc_v2_enabled: bool,
        mlnode_version: str,
        seed: int,
        start_height: int,
        first_poc_start: int | None,
        epoch: EpochShape | None,
        epoch_model: str,
        poc_model: str,
        governance_models: list[str] | None,
        confirmation_poc_enabled: bool,
        inference_interval_seconds: float | None,
    ) -> None:
        shape = epoch or profile.epoch
        first = first_poc_start if first_poc_start is not None else start_height + shape.epoch_length // 2
        self.host = host
        self.profile = profile
        self._callback_base_given = callback_base
        self.params = NetworkParams(
            epoch=EpochParams.from_shape(shape, epoch_shift=shape.epoch_length - first),
            block_seconds=profile.block_seconds,
            poc_v2_enabled=poc_v2_enabled,
            mlnode_version=mlnode_version,
            epoch_model=epoch_model,
            poc_model=poc_model,
            governance_models=list(governance_models or dict.fromkeys([epoch_model, poc_model])),
            callback_base=callback_base or "",
            confirmation_poc_enabled=confirmation_poc_enabled,
        )
        if inference_interval_seconds is not None:
            self.params.inference_interval_seconds = inference_interval_seconds
        self.seed = seed
        self.clock = BlockClock(profile.block_seconds, start_height)
        self.chain = Chain(self.params, start_height=start_height, seed=seed)
        self.registry = NodeRegistry()
        self._session: aiohttp.ClientSession | None = None
        self._public_port_req, self._admin_port_req, self._callback_port_req = public_port, admin_port, callback_port
        self._public: GatedListener | None = None
        self._admin: GatedListener | None = None
        self._client: NodeClient | None = None
        self._driver: NodeDriver | None = None
        self._traffic: InferenceTraffic | None = None
        self._callbacks: CallbackServer | None = None
        self._scheduler: BlockScheduler | None = None
        self.confirmation = ConfirmationPoC(self.chain, self.params, seed)

    # Components exist once started; these accessors keep the types honest.
    @property
    def client(self) -> NodeClient:
        assert self._client is not None, "dapi not started"
        return self._client

    @property
    def driver(self) -> NodeDriver:
        assert self._driver is not None, "dapi not started"
        return self._driver

    @property
    def traffic(self) -> InferenceTraffic:
        assert self._traffic is not None, "dapi not started"
        return self._traffic

    @property
    def callbacks(self) -> CallbackServer:
        assert self._callbacks is not None, "dapi not started"
        return self._callbacks

    @property
    def scheduler(self) -> BlockScheduler:
        assert self._scheduler is not None, "dapi not started"
        return self._scheduler

    @property
    def public_port(self) -> int:
        return self._public.port if self._public else 0

    @property
    def admin_port(self) -> int:
        return self._admin.port if self._admin else 0

    @property
    def callback_port(self) -> int:
        return self._callbacks.listener.port if self._callbacks else 0

    @property
    def public_url(self) -> str:
        return f"http://{self.host}:{self.public_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.host}:{self.admin_port}"

    @property
    def callback_url(self) -> str:
        return f"http://{self.host}:{self.callback_port}"

    def clock_info(self) -> dict[str, Any]:
        return {
            "height": self.chain.height,
            "clock_height": self.clock.height(),
            "paused": self.clock.paused,
            "block_seconds": self.clock.block_seconds,
            "latest_block_time": self.chain.last_block_time,
        }

    def update_params(self, changes: dict[str, Any]) -> list[str]:
        changed = self.params.update(changes)
        if "block_seconds" in changed:
            self.clock.set_block_seconds(self.params.block_seconds)
        if self._scheduler is not None:
            self._scheduler.wake()
        return changed

    def report(self) -> dict[str, Any]:
        return build_report(self)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False))
        self._client = NodeClient(self._session, self.params, self.profile)
        self._driver = NodeDriver(
            chain=self.chain, registry=self.registry, params=self.params, profile=self.profile, client=self._client
        )
        self._traffic = InferenceTraffic(
            chain=self.chain,
            registry=self.registry,
            params=self.params,
            profile=self.profile,
            client=self._client,
            session=self._session,
            seed=self.seed,
        )
        self._callbacks = CallbackServer(
            chain=self.chain,
            registry=self.registry,
            params=self.params,
            driver=self._driver,
            host=self.host,
            port=self._callback_port_req,
        )
        public_app = web.Application(client_max_size=16 * 1024**2)
        PublicRoutes(self).register(public_app)
        SimRoutes(self).register(public_app)
        self._public = GatedListener(public_app, host=self.host, port=self._public_port_req)
        self._admin = GatedListener(AdminRoutes(self).app(), host=self.host, port=self._admin_port_req)
        self._scheduler = BlockScheduler(
            clock=self.clock,
            chain=self.chain,
            registry=self.registry,
            params=self.params,
            profile=self.profile,
            driver=self._driver,
            confirmation=self.confirmation,
        )
        try:
            await self._public.start()
            await self._admin.start()
            await self._callbacks.listener.start()
        except BaseException:
            await self.close()
            raise
        if not self._callback_base_given:
            self.params.callback_base = self.callback_url
        self._scheduler.start()
        self._driver.start()
        self._traffic.start()
        log.info(
            "dapi sim: public %s admin %s callback %s (callback base %s)",
            self.public_url,
            self.admin_url,
            self.callback_url,
            self.params.callback_base,
        )

    async def close(self) -> None:
        if self._scheduler is not None:
            await self._scheduler.close()
        if self._traffic is not None:
            await self._traffic.close()
        if self._driver is not None:
            await self._driver.close()
        for listener in (self._public, self._admin, self._callbacks.listener if self._callbacks else None):
            if listener is not None:
                await listener.close()
        if self._session is not None:
            await self._session.close()
            self._session = None


class RunningDapi:
    """Handle returned by :func:`start_dapi`."""

    def __init__(self, dapi: Dapi) -> None:
        self.dapi = dapi

    @property
    def public_url(self) -> str:
        return self.dapi.public_url

    @property
    def admin_url(self) -> str:
        return self.dapi.admin_url

    @property
    def callback_url(self) -> str:
        """The dapi's own callback server (not necessarily the base it hands to MLNodes)."""
        return self.dapi.callback_url

    @property
    def callback_base(self) -> str:
        return self.dapi.params.callback_base

    def set_callback_base(self, url: str) -> None:
        self.dapi.update_params({"callback_base": url})

    def report(self) -> dict[str, Any]:
        return self.dapi.report()

    @property
    def height(self) -> int:
        return self.dapi.chain.height

    async def close(self) -> None:
        await self.dapi.close()


async def start_dapi(
    *,
    public_port: int = 0,
    admin_port: int = 0,
    callback_port: int = 0,
    host: str = "127.0.0.1",
    profile: TimeProfile | None = None,
    callback_base: str | None = None,
    poc_v2_enabled: bool = False,
    mlnode_version: str = "v3.0.8",
    seed: int = 0,
    start_height: int = 1,
    first_poc_start: int | None = None,
    epoch: EpochShape | None = None,
    epoch_model: str = DEFAULT_EPOCH_MODEL,
    poc_model: str = DEFAULT_POC_MODEL,
    governance_models: list[str] | None = None,
    confirmation_poc_enabled: bool = False,
    inference_interval_seconds: float | None = None,
) -> RunningDapi:
    """Start the network-node simulator in this event loop (ports 0 pick free ones).

    The chain starts at ``start_height`` in epoch 0; the first PoC starts at ``first_poc_start``
    (default: half an epoch later). Epoch parameters default from ``profile.epoch`` (or ``epoch``).
    ``callback_base`` is what the dapi hands to MLNodes (``DAPI_API__POC_CALLBACK_URL``); default: its own
    callback server. ``inference_interval_seconds`` is real seconds between simulated inferences (0 = off).
    """
    started = time.monotonic()
    dapi = Dapi(
        host=host,
        public_port=public_port,
        admin_port=admin_port,
        callback_port=callback_port,
        profile=profile or current_profile(),
        callback_base=callback_base,
        poc_v2_enabled=poc_v2_enabled,
        mlnode_version=mlnode_version,
        seed=seed,
        start_height=start_height,
        first_poc_start=first_poc_start,
        epoch=epoch,
        epoch_model=epoch_model,
        poc_model=poc_model,
        governance_models=governance_models,
        confirmation_poc_enabled=confirmation_poc_enabled,
        inference_interval_seconds=inference_interval_seconds,
    )
    await dapi.start()
    log.debug("dapi started in %.3fs", time.monotonic() - started)
    return RunningDapi(dapi)
