"""ComfyUI simulator, as the vastai/comfy image runs it (reference: comfyui.md).

``start_comfyui(...)`` runs one container in-process: an auth proxy on ``.port`` (the image's 8188) in
front of ComfyUI on ``.internal_port`` (18188, no auth). ``python -m sim comfyui --port P`` runs it as a
process. Test controls: ``/_sim/...`` (see ``sim.comfyui.controls``) or the ``RunningComfy`` methods.
"""

from sim.comfyui.machine import DEFAULT_MODELS, GpuInfo
from sim.comfyui.server import RunningComfy, start_comfyui
from sim.comfyui.vast_image import launch_options_from_env, portal_starts_comfyui

__all__ = [
    "DEFAULT_MODELS",
    "GpuInfo",
    "RunningComfy",
    "launch_options_from_env",
    "portal_starts_comfyui",
    "start_comfyui",
]
