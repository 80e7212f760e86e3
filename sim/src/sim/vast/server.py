"""Starting the Vast.ai simulator in-process: :func:`start_vast` → :class:`RunningVast`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from hybrid_common import TimeProfile, current_profile
from sim.vast.admin import add_admin_routes
from sim.vast.api import API_KEY, LIMITER, WORLD, add_routes, vast_gate
from sim.vast.faults import Fault
from sim.vast.ratelimits import RateLimiter
from sim.vast.world import VastSettings, VastWorld


@dataclass
class RunningVast:
    """A simulator serving on ``url``; ``world`` is its state for in-process tests."""

    port: int
    host: str
    world: VastWorld
    limiter: RateLimiter
    _runner: web.AppRunner

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def ledger(self) -> dict[str, Any]:
        return self.world.ledger()

    def inject(self, **fault: Any) -> Fault:
        """Arm a fault (see sim.vast.faults), as ``POST /_sim/faults`` does."""
        return self.world.arm(fault)

    async def close(self) -> None:
        """Stop serving, then stop every workload and SSH server the simulator started."""
        await self._runner.cleanup()
        await self.world.close()


async def start_vast(
    *,
    port: int = 0,
    api_key: str = "test",
    seed: int = 0,
    profile: TimeProfile | None = None,
    credit: float = 1000.0,
    host: str = "127.0.0.1",
    boot_scale: float = 1.0,
    rate_limits: bool = True,
    start_gpu_taken_probability: float = 0.0,
    ssh_host: str = "localhost",
    catalogue_size: int = 320,
) -> RunningVast:
    """Serve a simulated Vast.ai on ``host:port`` (0 = any free port).

    ``boot_scale`` multiplies every boot delay on top of the profile (0.1 → an MLNode instance serves in
    about a second under the TEST profile); ``rate_limits=False`` turns the 429s off.
    """
    prof = profile or current_profile()
    world = VastWorld(
        settings=VastSettings(
            api_key=api_key,
            seed=seed,
            profile=prof,
            credit=credit,
            boot_scale=boot_scale,
            start_gpu_taken_probability=start_gpu_taken_probability,
            ssh_host=ssh_host,
            catalogue_size=catalogue_size,
        ),
        profile=prof,
    )
    limiter = RateLimiter(scale=prof.scale(1.0), enabled=rate_limits)
    app = web.Application(middlewares=[vast_gate], client_max_size=4 * 1024 * 1024)
    app[WORLD] = world
    app[LIMITER] = limiter
    app[API_KEY] = api_key
    add_routes(app)
    add_admin_routes(app)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        await world.close()
        raise
    bound = port
    for address in runner.addresses:
        bound = int(address[1])
        break
    return RunningVast(port=bound, host=host, world=world, limiter=limiter, _runner=runner)
