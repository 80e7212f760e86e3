"""Starting and stopping the upstream simulator in-process (tests, the demo, other simulators)."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from hybrid_common import TimeProfile, current_profile
from sim.upstream.app import UpstreamApp, UpstreamState
from sim.upstream.controls import Fault, UpstreamSettings

DEFAULT_API_KEY = "sim-upstream-key"
# Models Hyperbolic serves that Gonka uses (gonka-protocol.md); the first two are the agreed defaults.
DEFAULT_MODELS: tuple[str, ...] = (
    "Qwen/Qwen2.5-7B-Instruct",
    "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8",
    "Qwen/QwQ-32B",
    "meta-llama/Llama-3.3-70B-Instruct",
    "deepseek-ai/DeepSeek-V3",
)


@dataclass
class RunningUpstream:
    """A started upstream: ``url`` is the OpenAI base URL (ends in ``/v1``)."""

    host: str
    port: int
    state: UpstreamState
    _runner: web.AppRunner

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def root(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_key(self) -> str:
        return self.state.api_key

    def configure(self, **changes: object) -> None:
        """Same as ``POST /_sim/config``: latency_ms, ttft_ms, tokens_per_s, rate_limit_per_min."""
        self.state.configure(dict(changes))

    def inject(self, fault: Fault) -> None:
        """Same as ``POST /_sim/faults``."""
        self.state.inject(fault)

    async def close(self) -> None:
        await self._runner.cleanup()


async def start_upstream(
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    api_key: str = DEFAULT_API_KEY,
    models: list[str] | None = None,
    latency_ms: float = 0,
    ttft_ms: float = 0,
    tokens_per_s: float = 0,
    rate_limit_per_min: int | None = None,
    seed: int = 0,
    profile: TimeProfile | None = None,
    reuse_port: bool = False,
) -> RunningUpstream:
    """Start an OpenAI-compatible upstream (a Hyperbolic stand-in) on ``host:port`` (0 = any free port)."""
    settings = UpstreamSettings()
    settings.update(
        {
            "latency_ms": latency_ms,
            "ttft_ms": ttft_ms,
            "tokens_per_s": tokens_per_s,
            "rate_limit_per_min": rate_limit_per_min,
        }
    )
    state = UpstreamState(
        api_key=api_key,
        models=list(models) if models else list(DEFAULT_MODELS),
        settings=settings,
        profile=profile or current_profile(),
        seed=seed,
    )
    # handler_cancellation: a client that goes away cancels its handler at once, so an open stream is
    # seen closing within milliseconds (what a proxy's "disconnect cancels upstream" test measures).
    runner = web.AppRunner(UpstreamApp(state).build(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_port=reuse_port or None)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    return RunningUpstream(host=host, port=int(bound), state=state, _runner=runner)
