"""Workload profiles: what to run on a rented GPU, how to reach it, when it is ready, and which offers fit.

Each profile states its image, exposed ports, runtype and ``onstart`` (vastai-api.md "runtype": the ssh runtypes
give SSH but replace the image's entrypoint, so the image's own start command goes in ``onstart``; ``args`` keeps the
entrypoint and gives no SSH), env, disk, readiness probe and offer policy. Built-in profiles:

- ``mlnode-v1``: the seeds' MLNode 3.0.11-post1 (PoC v1), pinned by digest; ready when ``GET /api/v1/state`` answers.
- ``mlnode-v2``: a 3.0.12+ MLNode by tag (PoC v2, gonka-protocol.md §7): PoC runs inside vLLM on the model the node
  already serves, so ready means ``inference/up`` issued with the PoC model and vLLM healthy with it loaded; offers
  are sized by the model's VRAM across several GPUs.
- ``comfyui``: ``vastai/comfy`` (comfyui.md): ``PORTAL_CONFIG`` naming ComfyUI, our own ``WEB_PASSWORD``, ready when
  ``/system_stats`` answers JSON with a CUDA device through the image's auth proxy on 8188.

Overrides: a JSON file (``PROVISIONER_PROFILES_FILE``: ``{"mlnode-v1": {"policy": {"max_dph": 2.0}}, "my-new": {...}}``,
merged over the built-ins), the seeds' variables (``VASTAI_MAX_PRICE``, ``VASTAI_MIN_VRAM``, ``VASTAI_GPU_TYPE``,
``VASTAI_DISK_SIZE``; ``DOCKER_IMAGE`` for the seeds' profile ``mlnode-v1``), ``PROVISIONER_IMAGE_<PROFILE>`` (e.g.
``PROVISIONER_IMAGE_MLNODE_V2``) and a command's own ``image``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from hybrid_common.messages.domain import OfferFilter
from hybrid_provisioner.settings import ProvisionerSettings

# The image the seeds run, pinned by the digest they give (gonka-protocol.md §1: PoC v1 only).
MLNODE_V1_IMAGE = "ghcr.io/product-science/mlnode:3.0.11-post1@sha256:0cf224b2f88694def989731ecdd23950a6d899be5d70e01e8dcf823b906199af"
# gonka-protocol.md §7: from 3.0.13 the image lives at ghcr.io/gonka-ai/mlnode.
MLNODE_V2_IMAGE = "ghcr.io/gonka-ai/mlnode:3.0.14-post2"
COMFYUI_IMAGE = "vastai/comfy:v0.3.66-cuda-12.9-py312"
# The MLNode image's own start command (its CMD): with an ssh runtype it must run from onstart.
MLNODE_START_COMMAND = "uvicorn api.app:app --host=0.0.0.0 --port=8080"
# comfyui.md: the vastai/comfy startup is the image entrypoint.
COMFY_ENTRYPOINT = "/opt/instance-tools/bin/entrypoint.sh"
COMFY_PORTAL_CONFIG = "localhost:1111:11111:/:Instance Portal|localhost:8188:18188:/:ComfyUI"

EPOCH_MODEL = "Qwen/Qwen2.5-7B-Instruct"
POC_V2_MODEL = "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8"

ReadinessKind = Literal["mlnode", "mlnode_model", "comfyui", "tcp"]


class OfferPolicy(BaseModel):
    """Which offers fit a profile; the cheapest adequate one is taken first."""

    model_config = ConfigDict(extra="forbid")

    gpu_names: list[str] | None = None
    min_vram_gb: float = Field(default=40.0, gt=0, description="per GPU")
    min_total_vram_gb: float | None = Field(default=None, gt=0, description="across the offer's GPUs (model size)")
    min_gpus: int = Field(default=1, ge=1)
    max_gpus: int = Field(default=1, ge=1)
    max_dph: float = Field(default=3.0, gt=0, description="$/h cap, dph_total")
    min_reliability: float = Field(default=0.9, ge=0, le=1)
    min_cuda: float | None = 12.0
    min_inet_down_mbps: float | None = None
    verified: bool = True
    exclude_machine_ids: list[int] = Field(default_factory=list)
    offer_type: str = "on-demand"
    search_limit: int = Field(default=64, ge=1, le=1000)

    def narrowed(self, override: OfferFilter | None, excluded: list[int]) -> OfferPolicy:
        """This policy with a command's overrides and the job's excluded machines applied."""
        update: dict[str, Any] = {"exclude_machine_ids": sorted({*self.exclude_machine_ids, *excluded})}
        if override is not None:
            if override.gpu_names:
                update["gpu_names"] = list(override.gpu_names)
            if override.min_gpus is not None:
                update["min_gpus"] = override.min_gpus
                update["max_gpus"] = max(self.max_gpus, override.min_gpus)
            if override.min_vram_gb is not None:
                update["min_vram_gb"] = override.min_vram_gb
            if override.max_dph is not None:
                update["max_dph"] = override.max_dph
            if override.min_reliability is not None:
                update["min_reliability"] = override.min_reliability
            if override.min_inet_down_mbps is not None:
                update["min_inet_down_mbps"] = override.min_inet_down_mbps
            update["exclude_machine_ids"] = sorted({*update["exclude_machine_ids"], *override.exclude_machine_ids})
        return self.model_copy(update=update)


class Readiness(BaseModel):
    """How to tell the workload is up (probed once the instance runs and its ports are known)."""

    model_config = ConfigDict(extra="forbid")

    kind: ReadinessKind
    container_port: int = Field(ge=1, le=65535, description="the container port probed")
    model: str | None = Field(default=None, description="mlnode_model: the model vLLM must serve")
    dtype: str = "auto"
    model_args: list[str] = Field(default_factory=list)


class WorkloadProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    image: str
    runtype: str = Field(default="ssh", description="ssh (SSH + onstart) or args (image entrypoint, no SSH)")
    onstart: str | None = None
    args: list[str] | None = None
    ports: list[int] = Field(description="container ports published with -p (each needs a direct port)")
    env: dict[str, str] = Field(default_factory=dict)
    disk_gb: float = Field(default=100.0, ge=8)
    readiness: Readiness
    generation: Literal["v1", "v2"] | None = None
    front: bool = Field(default=False, description="reached by the dapi through the node front (gateway ports)")
    api_port: int = Field(default=8080, description="container port behind the slot's gateway PoC port")
    inference_port: int = Field(default=5000, description="container port behind the slot's gateway inference port")
    node_models: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="models of the dapi registration (each a governance model)"
    )
    connectivity: Literal["auto", "direct", "tunnel"] = "auto"
    password_env: str | None = Field(default=None, description="env var holding the auth proxy's password")
    policy: OfferPolicy = Field(default_factory=OfferPolicy)

    @property
    def gives_ssh(self) -> bool:
        return any(t.startswith(("ssh", "jupyter")) for t in self.runtype.split())


def _builtin(settings: ProvisionerSettings) -> dict[str, dict[str, Any]]:
    gpu_names = [g.strip() for g in settings.vastai_gpu_type.split(",")] if settings.vastai_gpu_type else None
    mlnode_env = {"HF_HOME": "/data/hf"}
    return {
        "mlnode-v1": {
            "name": "mlnode-v1",
            "image": settings.docker_image or MLNODE_V1_IMAGE,
            "runtype": "ssh",
            "onstart": MLNODE_START_COMMAND,
            "ports": [8080, 5000],
            "env": mlnode_env,
            "disk_gb": settings.vastai_disk_size,
            "readiness": {"kind": "mlnode", "container_port": 8080},
            "generation": "v1",
            "front": True,
            "node_models": {EPOCH_MODEL: {"args": []}},
            "policy": {
                "gpu_names": gpu_names,
                "min_vram_gb": settings.vastai_min_vram,
                "max_dph": settings.vastai_max_price,
            },
        },
        "mlnode-v2": {
            "name": "mlnode-v2",
            "image": MLNODE_V2_IMAGE,
            "runtype": "ssh",
            "onstart": MLNODE_START_COMMAND,
            "ports": [8080, 5000],
            "env": mlnode_env,
            "disk_gb": max(settings.vastai_disk_size, 400),
            "readiness": {"kind": "mlnode_model", "container_port": 8080, "model": POC_V2_MODEL, "dtype": "auto"},
            "generation": "v2",
            "front": True,
            "node_models": {POC_V2_MODEL: {"args": []}},
            "policy": {
                # gonka-protocol.md §7: the 235B FP8 PoC model spans several large GPUs.
                "gpu_names": gpu_names or ["H100 SXM", "H100 PCIE", "H200", "B200", "A100 SXM4"],
                "min_vram_gb": 40.0,
                "min_total_vram_gb": 300.0,
                "min_gpus": 2,
                "max_gpus": 8,
                "max_dph": max(settings.vastai_max_price, 16.0),
            },
        },
        "comfyui": {
            "name": "comfyui",
            "image": COMFYUI_IMAGE,
            # comfyui.md: an ssh runtype skips the entrypoint unless onstart runs it; SSH is wanted for tunnels.
            "runtype": "ssh",
            "onstart": COMFY_ENTRYPOINT,
            "ports": [8188],
            "env": {"PORTAL_CONFIG": COMFY_PORTAL_CONFIG},
            "disk_gb": 60.0,
            "readiness": {"kind": "comfyui", "container_port": 8188},
            "front": False,
            "password_env": "WEB_PASSWORD",
            "policy": {"gpu_names": gpu_names, "min_vram_gb": 16.0, "max_dph": settings.vastai_max_price},
        },
    }


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("env", "node_models"):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_profiles(settings: ProvisionerSettings) -> dict[str, WorkloadProfile]:
    raw = _builtin(settings)
    if settings.profiles_file:
        extra = orjson.loads(Path(settings.profiles_file).expanduser().read_bytes())
        if not isinstance(extra, dict):
            raise ValueError(f"{settings.profiles_file}: expected an object of profiles")
        for name, over in extra.items():
            raw[name] = _merge(raw.get(name, {"name": name}), {**over, "name": name})
    for name in raw:
        image = os.environ.get("PROVISIONER_IMAGE_" + name.upper().replace("-", "_"))
        if image:
            raw[name]["image"] = image
    return {name: WorkloadProfile.model_validate(spec) for name, spec in raw.items()}
