"""The images a simulated Vast.ai host can pull, and what each one runs.

A small, explicit registry: an image reference the registry does not know never pulls (the instance
stays ``created`` with Docker's "manifest ... not found" message, vastai-api.md "Failure signatures").
Pull and service-start times are *real-world* seconds; the Vast simulator scales them by the time profile.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final, Literal

WorkloadKind = Literal["mlnode", "comfyui", "generic"]

# The MLNode image's own start command (the image's CMD); with an ssh/jupyter runtype Vast replaces the
# entrypoint, so this must appear in `onstart` for the MLNode API to come up (vastai-api.md "runtype").
MLNODE_START_COMMAND: Final = "uvicorn api.app:app --host=0.0.0.0 --port=8080"
# comfyui.md: the vastai/comfy startup is the image entrypoint; ssh/jupyter runtypes skip it unless onstart runs it.
COMFY_ENTRYPOINT: Final = "/opt/instance-tools/bin/entrypoint.sh"

# The digest ghcr.io/product-science/mlnode:3.0.11-post1 is pinned by (the image the seeds run).
MLNODE_3011_DIGEST: Final = "sha256:0cf224b2f88694def989731ecdd23950a6d899be5d70e01e8dcf823b906199af"

# gonka-protocol.md §1: the MLNode API listens on 8080 inside the container, vLLM inference on 5000.
MLNODE_API_PORT: Final = 8080
MLNODE_INFERENCE_PORT: Final = 5000
# comfyui.md: Caddy (auth) on 8188 in front of ComfyUI on 127.0.0.1:18188.
COMFY_PROXY_PORT: Final = 8188
COMFY_INTERNAL_PORT: Final = 18188
# vastai-api.md: jupyter runtypes put Jupyter on 8080 — the MLNode's API port.
JUPYTER_PORT: Final = 8080


@dataclass(frozen=True)
class ImageSpec:
    """What a pullable image is and how long it takes to become useful."""

    reference: str
    kind: WorkloadKind
    start_command: str | None
    # real-world seconds (min, max): pulling the image; from container start to the service listening
    pull_seconds: tuple[float, float]
    service_seconds: tuple[float, float]
    generation: str = "v1"
    service_ports: tuple[int, ...] = field(default=())
    # real-world seconds to fetch model weights once the service runs (the MLNode's HF cache)
    model_seconds: tuple[float, float] = (0.0, 0.0)

    def starts_from(self, onstart: str | None) -> bool:
        """Whether an onstart script (or an args-runtype entrypoint override) runs this image's service."""
        if not onstart or self.start_command is None:
            return False
        return _normalise(self.start_command) in _normalise(onstart)


@dataclass(frozen=True)
class ImageRef:
    registry: str
    repository: str
    tag: str | None
    digest: str | None


def _normalise(command: str) -> str:
    return " ".join(command.split())


_REF = re.compile(r"^[a-z0-9][a-z0-9._\-/:@]*$")


def parse_reference(reference: str) -> ImageRef | None:
    """Docker reference grammar, enough of it: ``[registry/]repo[:tag][@digest]``."""
    ref = reference.strip()
    if not ref or not _REF.match(ref):
        return None
    digest = None
    if "@" in ref:
        ref, digest = ref.split("@", 1)
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            return None
    tag = None
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        ref, tag = ref.rsplit(":", 1)
    parts = ref.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        registry, repo = parts[0], "/".join(parts[1:])
    else:
        registry, repo = "docker.io", ref
    if registry == "docker.io" and "/" not in repo:
        repo = f"library/{repo}"
    return ImageRef(registry=registry, repository=repo, tag=tag, digest=digest)


_MLNODE_PULL = (150.0, 480.0)  # ~20 GB of CUDA + vLLM layers
_MLNODE_BOOT = (20.0, 60.0)  # uvicorn importing torch/vLLM before the API answers
_MLNODE_MODEL = (60.0, 240.0)  # model weights fetched into the HF cache
_COMFY_PULL = (90.0, 300.0)
_COMFY_PROVISION = (60.0, 240.0)  # comfyui.md: provisioning scripts run before ComfyUI serves
_GENERIC_PULL = (20.0, 90.0)


def _mlnode(reference: str, generation: str) -> ImageSpec:
    return ImageSpec(
        reference=reference,
        kind="mlnode",
        start_command=MLNODE_START_COMMAND,
        pull_seconds=_MLNODE_PULL,
        service_seconds=_MLNODE_BOOT,
        generation=generation,
        service_ports=(MLNODE_API_PORT, MLNODE_INFERENCE_PORT),
        model_seconds=_MLNODE_MODEL,
    )


def _mlnode_generation(tag: str) -> str | None:
    """Image tag → PoC generation: 3.0.11* speaks PoC v1, 3.0.12 and later v2 (gonka-protocol.md §7)."""
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)", tag)
    if not m:
        return None
    version = tuple(int(x) for x in m.groups())
    return "v1" if version < (3, 0, 12) else "v2"


# Tags that exist per repository (an unknown tag has no manifest). `None` = any tag of that family.
_MLNODE_TAGS: Final[dict[str, tuple[str, ...]]] = {
    "product-science/mlnode": ("3.0.11-post1", "3.0.12*"),
    "gonka-ai/mlnode": ("3.0.13", "3.0.14-post2"),
}
_KNOWN_DIGESTS: Final[dict[tuple[str, str], str]] = {
    ("product-science/mlnode", MLNODE_3011_DIGEST): "3.0.11-post1",
}
_GENERIC_REPOS: Final = (
    "library/ubuntu",
    "pytorch/pytorch",
    "nvidia/cuda",
    "vastai/base-image",
    "vastai/pytorch",
)


def _tag_allowed(tag: str, patterns: tuple[str, ...]) -> bool:
    return any(tag.startswith(p[:-1]) if p.endswith("*") else tag == p for p in patterns)


def resolve_image(reference: str) -> ImageSpec | None:
    """The registry entry for ``reference``, or ``None`` when no registry would serve its manifest."""
    ref = parse_reference(reference)
    if ref is None:
        return None
    if ref.registry == "ghcr.io" and ref.repository in _MLNODE_TAGS:
        tag = ref.tag
        if ref.digest is not None:
            pinned = _KNOWN_DIGESTS.get((ref.repository, ref.digest))
            # A digest Docker cannot find is "manifest unknown", whatever the tag says.
            if pinned is None or (tag is not None and tag != pinned):
                return None
            tag = pinned
        if tag is None or not _tag_allowed(tag, _MLNODE_TAGS[ref.repository]):
            return None
        generation = _mlnode_generation(tag)
        return _mlnode(reference, generation) if generation else None
    if ref.registry == "docker.io" and ref.repository == "vastai/comfy" and ref.digest is None:
        return ImageSpec(
            reference=reference,
            kind="comfyui",
            start_command=COMFY_ENTRYPOINT,
            pull_seconds=_COMFY_PULL,
            service_seconds=_COMFY_PROVISION,
            service_ports=(COMFY_PROXY_PORT, COMFY_INTERNAL_PORT),
        )
    if ref.registry == "docker.io" and ref.repository in _GENERIC_REPOS and ref.digest is None:
        return ImageSpec(
            reference=reference,
            kind="generic",
            start_command=None,
            pull_seconds=_GENERIC_PULL,
            service_seconds=(0.0, 0.0),
        )
    return None


def manifest_not_found(reference: str) -> str:
    """Docker's message for an image it cannot pull (vastai-api.md "Failure signatures")."""
    ref = parse_reference(reference)
    name = reference.strip()
    if ref is not None and ref.tag is None and ref.digest is None:
        name = f"{name}:latest"
    return f"Error response from daemon: manifest for {name} not found: manifest unknown: manifest unknown"
