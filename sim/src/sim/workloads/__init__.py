"""What runs inside a simulated Vast.ai instance: the image registry and the container's services.

The provisioner's profiles import the image facts from here::

    from sim.workloads import MLNODE_START_COMMAND, COMFY_ENTRYPOINT

- ``MLNODE_START_COMMAND``: put it in ``onstart`` with an ssh runtype to start the MLNode API
  (the ssh runtypes replace the image's entrypoint, vastai-api.md).
- ``COMFY_ENTRYPOINT``: the vastai/comfy startup (comfyui.md); same rule.
- ``resolve_image(ref)``: the registry entry, ``None`` for an image that never pulls.
"""

from sim.workloads.container import ContainerSpec, RunningContainer, has_jupyter, has_ssh
from sim.workloads.images import (
    COMFY_ENTRYPOINT,
    COMFY_INTERNAL_PORT,
    COMFY_PROXY_PORT,
    MLNODE_3011_DIGEST,
    MLNODE_API_PORT,
    MLNODE_INFERENCE_PORT,
    MLNODE_START_COMMAND,
    ImageSpec,
    manifest_not_found,
    resolve_image,
)
from sim.workloads.network import ContainerNetwork, allocate_port

__all__ = [
    "COMFY_ENTRYPOINT",
    "COMFY_INTERNAL_PORT",
    "COMFY_PROXY_PORT",
    "MLNODE_3011_DIGEST",
    "MLNODE_API_PORT",
    "MLNODE_INFERENCE_PORT",
    "MLNODE_START_COMMAND",
    "ContainerNetwork",
    "ContainerSpec",
    "ImageSpec",
    "RunningContainer",
    "allocate_port",
    "has_jupyter",
    "has_ssh",
    "manifest_not_found",
    "resolve_image",
]
