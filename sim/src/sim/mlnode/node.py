"""One simulated MLNode: the control API on one port, vLLM's OpenAI routes on another.

Generations (gonka-protocol.md §1, §7): ``v1`` is image 3.0.11 (PoC through ``/api/v1/pow/*``,
callbacks with the v1 sender habits); ``v2`` is 3.0.12+ (PoC inside vLLM through
``/api/v1/inference/pow/*``, a proxy that always holds the inference port, the v2 sender habits).
Both keep the v1 routes. Neither strips the dapi's ``/{version}`` prefix.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp

from hybrid_common import TimeProfile, current_profile
from sim.mlnode.control_api import ControlRoutes
from sim.mlnode.listener import GatedListener
from sim.mlnode.models import ModelCache
from sim.mlnode.openai_api import OpenAIRoutes
from sim.mlnode.pow_v1 import PowV1Engine
from sim.mlnode.pow_v2 import PocV2Engine
from sim.mlnode.senders import V1CallbackSender, V2CallbackSender
from sim.mlnode.vllm import VllmRunner

log = logging.getLogger(__name__)

DEFAULT_EPOCH_MODEL = "Qwen/Qwen2.5-7B-Instruct"
DEFAULT_POC_MODEL = "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8"
IMAGE_VERSION = {"v1": "3.0.11", "v2": "3.0.12"}
MODEL_DOWNLOAD_SECONDS = 120.0  # real-world time to pull a model into the HF cache
VLLM_LOAD_SECONDS = 60.0  # real-world time for vLLM to load weights and answer


@dataclass
class MLNodeConfig:
    generation: str = "v1"
    host: str = "127.0.0.1"
    api_port: int = 0
    inference_port: int = 0
    gpu_name: str = "H100 SXM"
    gpu_count: int = 1
    vram_mb: int = 81920
    model_download_seconds: float | None = None
    vllm_load_seconds: float | None = None
    preload_models: list[str] | None = None
    seed: int = 0


class MLNode:
    def __init__(self, config: MLNodeConfig, profile: TimeProfile) -> None:
        if config.generation not in ("v1", "v2"):
            raise ValueError(f"generation must be 'v1' or 'v2', not {config.generation!r}")
        self.config = config
        self.profile = profile
        self.generation = config.generation
        self.version = IMAGE_VERSION[config.generation]
        self.gpu_count = config.gpu_count
        download = (
            config.model_download_seconds
            if config.model_download_seconds is not None
            else profile.scale(MODEL_DOWNLOAD_SECONDS)
        )
        load = config.vllm_load_seconds if config.vllm_load_seconds is not None else profile.scale(VLLM_LOAD_SECONDS)
        self.cache = ModelCache(download)
        self.vllm = VllmRunner(self.cache, load_seconds=load, on_change=self._on_vllm_change)
        self._session: aiohttp.ClientSession | None = None
        self.v1_sender: V1CallbackSender | None = None
        self.v2_sender: V2CallbackSender | None = None
        self._pow_v1: PowV1Engine | None = None
        self._pow_v2: PocV2Engine | None = None
        self.openai = OpenAIRoutes(self.vllm, profile)
        self.api_listener = GatedListener(ControlRoutes(self).app(), host=config.host, port=config.api_port)
        # Before 3.0.12 the inference port is vLLM itself: closed until vLLM is up.
        self.inference_listener = GatedListener(
            self.openai.app(), host=config.host, port=config.inference_port, open_=self.generation == "v2"
        )

    @property
    def pow_v1(self) -> PowV1Engine:
        assert self._pow_v1 is not None, "MLNode not started"
        return self._pow_v1

    @property
    def pow_v2(self) -> PocV2Engine:
        assert self._pow_v2 is not None, "MLNode not started"
        return self._pow_v2

    @property
    def api_port(self) -> int:
        return self.api_listener.port

    @property
    def inference_port(self) -> int:
        return self.inference_listener.port

    @property
    def service_state(self) -> str:
        if self._pow_v1 is not None and self._pow_v1.is_running:
            return "POW"
        if self.vllm.is_running:
            return "INFERENCE"
        return "STOPPED"

    def _on_vllm_change(self) -> None:
        if self.vllm.is_up:
            self.inference_listener.open()
        else:
            if self.generation == "v1":
                self.inference_listener.shut()
            if self._pow_v2 is not None:
                self._pow_v2.on_vllm_down()

    def stop_all(self) -> None:
        if self._pow_v1 is not None:
            self._pow_v1.stop()
        if self._pow_v2 is not None:
            self._pow_v2.stop()
        self.vllm.down()

    def gpu_devices(self) -> list[dict[str, Any]]:
        used = 0.9 if self.vllm.is_running else (0.5 if self.service_state == "POW" else 0.01)
        return [
            {
                "index": i,
                "name": f"NVIDIA {self.config.gpu_name}",
                "total_memory_mb": self.config.vram_mb,
                "free_memory_mb": int(self.config.vram_mb * (1 - used)),
                "used_memory_mb": int(self.config.vram_mb * used),
                "utilization_percent": 95.0 if used > 0.1 else 0.0,
                "temperature_c": 62.0,
                "is_available": True,
            }
            for i in range(self.gpu_count)
        ]

    def stats(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "version": self.version,
            "state": self.service_state,
            "vllm": self.vllm.describe(),
            "pow_v1": {**self.pow_v1.describe(), **vars(self.pow_v1.stats)},
            "pow_v2": {
                "status": self.pow_v2.status,
                "artifacts_generated": self.pow_v2.artifacts_generated,
                "validations_done": self.pow_v2.validations_done,
            },
            "senders": {
                "v1": self.v1_sender.stats.as_dict() if self.v1_sender else None,
                "v1_pending": self.v1_sender.pending if self.v1_sender else 0,
                "v2": self.v2_sender.stats.as_dict() if self.v2_sender else None,
                "v2_pending": self.v2_sender.pending if self.v2_sender else 0,
            },
            "inference_requests": self.openai.requests_served,
            "models": self.cache.list(),
        }

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        self.v1_sender = V1CallbackSender(self._session, self.profile)
        self.v2_sender = V2CallbackSender(self._session, self.profile)
        self.v1_sender.start()
        self.v2_sender.start()
        self._pow_v1 = PowV1Engine(self.v1_sender, self.profile, gpu_count=self.gpu_count, seed=self.config.seed)
        try:
            await self.api_listener.start()
            await self.inference_listener.start()
        except BaseException:
            await self.close()
            raise
        self._pow_v2 = PocV2Engine(
            self.vllm,
            self.v2_sender,
            self.profile,
            port=self.inference_port,
            gpu_count=self.gpu_count,
            seed=self.config.seed,
        )
        preload = self.config.preload_models
        if preload is None:
            preload = [DEFAULT_EPOCH_MODEL if self.generation == "v1" else DEFAULT_POC_MODEL]
        for model in preload:
            with contextlib.suppress(ValueError):
                self.cache.start(model)

    async def close(self) -> None:
        if self._pow_v1 is not None:
            await self._pow_v1.close()
        if self._pow_v2 is not None:
            await self._pow_v2.close()
        await self.vllm.close()
        for sender in (self.v1_sender, self.v2_sender):
            if sender is not None:
                await sender.close()
        await self.cache.close()
        await self.api_listener.close()
        await self.inference_listener.close()
        if self._session is not None:
            await self._session.close()


class RunningMLNode:
    """Handle returned by :func:`start_mlnode`."""

    def __init__(self, node: MLNode) -> None:
        self.node = node

    @property
    def api_port(self) -> int:
        return self.node.api_port

    @property
    def inference_port(self) -> int:
        return self.node.inference_port

    @property
    def api_url(self) -> str:
        return f"http://{self.node.config.host}:{self.api_port}"

    @property
    def inference_url(self) -> str:
        return f"http://{self.node.config.host}:{self.inference_port}"

    async def close(self) -> None:
        await self.node.close()


async def start_mlnode(
    *,
    generation: str = "v1",
    api_port: int = 0,
    inference_port: int = 0,
    host: str = "127.0.0.1",
    profile: TimeProfile | None = None,
    gpu_name: str = "H100 SXM",
    gpu_count: int = 1,
    vram_mb: int = 81920,
    model_download_seconds: float | None = None,
    seed: int = 0,
    vllm_load_seconds: float | None = None,
    preload_models: list[str] | None = None,
) -> RunningMLNode:
    """Start an MLNode simulator in this event loop; ports 0 pick free ones.

    ``model_download_seconds`` / ``vllm_load_seconds`` are wall seconds (default: the profile's scaling
    of 120 s / 60 s). ``preload_models`` start downloading at boot (default: the generation's usual
    model — Qwen2.5-7B for v1, the v2 PoC model for v2); ``[]`` boots with an empty cache. ``seed`` sets the
    node's phase in the 5 s batch cadence; every PoC value and token is a pure function of its inputs.
    """
    config = MLNodeConfig(
        generation=generation,
        host=host,
        api_port=api_port,
        inference_port=inference_port,
        gpu_name=gpu_name,
        gpu_count=gpu_count,
        vram_mb=vram_mb,
        model_download_seconds=model_download_seconds,
        vllm_load_seconds=vllm_load_seconds,
        preload_models=preload_models,
        seed=seed,
    )
    node = MLNode(config, profile or current_profile())
    await node.start()
    return RunningMLNode(node)
