"""The node classes the simulated ComfyUI knows: inputs, outputs, and how long they take on a real GPU.

A subset of ComfyUI's built-in nodes (``nodes.py`` of ComfyUI v0.3.6x), enough for text-to-image and
image-to-image workflows. Input specs keep ComfyUI's shape — ``("INT", {"default", "min", "max"})`` or a
list of choices — because validation errors echo them back as ``input_config`` (comfyui.md: node_errors).
A class missing here is "a missing custom node": ``/prompt`` answers 400 ``invalid_prompt``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_RESOLUTION = 16384
# KSampler.SAMPLERS / SCHEDULERS of ComfyUI (comfy/samplers.py), in its order.
SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
    "res_multistep_cfg_pp", "gradient_estimation", "er_sde", "seeds_2", "seeds_3", "ddim", "uni_pc", "uni_pc_bh2",
]  # fmt: skip
SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
              "linear_quadratic", "kl_optimal"]  # fmt: skip

InputSpec = tuple[Any, ...]  # ("INT", {...}) | (["a", "b"], {...}) | ("MODEL",)
ChoicesFn = Callable[[], list[str]]


@dataclass(frozen=True)
class NodeClass:
    name: str
    display_name: str
    category: str
    required: dict[str, InputSpec]
    returns: tuple[str, ...] = ()
    return_names: tuple[str, ...] | None = None
    output_node: bool = False
    # Inputs whose choices come from the machine (model folders, the input directory).
    dynamic_choices: dict[str, str] = field(default_factory=dict)  # input -> models folder or "@input"
    # Inputs checked by the class's VALIDATE_INPUTS instead of the choice list (LoadImage.image).
    custom_validated: frozenset[str] = frozenset()
    hidden: dict[str, str] = field(default_factory=dict)


def _int(default: int, lo: int, hi: int, step: int = 1) -> InputSpec:
    return ("INT", {"default": default, "min": lo, "max": hi, "step": step})


def _float(default: float, lo: float, hi: float, step: float = 0.01) -> InputSpec:
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step})


NODE_CLASSES: dict[str, NodeClass] = {
    n.name: n
    for n in (
        NodeClass(
            "CheckpointLoaderSimple",
            "Load Checkpoint",
            "loaders",
            {"ckpt_name": ([],)},
            ("MODEL", "CLIP", "VAE"),
            dynamic_choices={"ckpt_name": "checkpoints"},
        ),
        NodeClass(
            "LoraLoader",
            "Load LoRA",
            "loaders",
            {
                "model": ("MODEL",),
                "clip": ("CLIP",),
                "lora_name": ([],),
                "strength_model": _float(1.0, -100.0, 100.0),
                "strength_clip": _float(1.0, -100.0, 100.0),
            },
            ("MODEL", "CLIP"),
            dynamic_choices={"lora_name": "loras"},
        ),
        NodeClass(
            "VAELoader", "Load VAE", "loaders", {"vae_name": ([],)}, ("VAE",), dynamic_choices={"vae_name": "vae"}
        ),
        NodeClass(
            "CLIPTextEncode",
            "CLIP Text Encode (Prompt)",
            "conditioning",
            {"text": ("STRING", {"multiline": True, "dynamicPrompts": True}), "clip": ("CLIP",)},
            ("CONDITIONING",),
        ),
        NodeClass(
            "EmptyLatentImage",
            "Empty Latent Image",
            "latent",
            {
                "width": _int(512, 16, MAX_RESOLUTION, 8),
                "height": _int(512, 16, MAX_RESOLUTION, 8),
                "batch_size": _int(1, 1, 4096),
            },
            ("LATENT",),
        ),
        NodeClass(
            "KSampler",
            "KSampler",
            "sampling",
            {
                "model": ("MODEL",),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
                "steps": _int(20, 1, 10000),
                "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                "sampler_name": (SAMPLERS,),
                "scheduler": (SCHEDULERS,),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "latent_image": ("LATENT",),
                "denoise": _float(1.0, 0.0, 1.0),
            },
            ("LATENT",),
        ),
        NodeClass(
            "VAEDecode",
            "VAE Decode",
            "latent",
            {"samples": ("LATENT",), "vae": ("VAE",)},
            ("IMAGE",),
        ),
        NodeClass(
            "VAEEncode",
            "VAE Encode",
            "latent",
            {"pixels": ("IMAGE",), "vae": ("VAE",)},
            ("LATENT",),
        ),
        NodeClass(
            "LoadImage",
            "Load Image",
            "image",
            {"image": ([], {"image_upload": True})},
            ("IMAGE", "MASK"),
            dynamic_choices={"image": "@input"},
            custom_validated=frozenset({"image"}),
        ),
        NodeClass(
            "ImageScale",
            "Upscale Image",
            "image/upscaling",
            {
                "image": ("IMAGE",),
                "upscale_method": (["nearest-exact", "bilinear", "area", "bicubic", "lanczos"],),
                "width": _int(512, 0, MAX_RESOLUTION),
                "height": _int(512, 0, MAX_RESOLUTION),
                "crop": (["disabled", "center"],),
            },
            ("IMAGE",),
        ),
        NodeClass(
            "SaveImage",
            "Save Image",
            "image",
            {
                "images": ("IMAGE",),
                "filename_prefix": ("STRING", {"default": "ComfyUI"}),
            },
            output_node=True,
            hidden={"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        ),
        NodeClass(
            "PreviewImage",
            "Preview Image",
            "image",
            {"images": ("IMAGE",)},
            output_node=True,
            hidden={"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        ),
    )
}


def input_spec(node: NodeClass, name: str, choices: Callable[[str], list[str]]) -> InputSpec:
    """The spec of one input with its machine-dependent choices filled in (models, input files)."""
    spec = node.required[name]
    folder = node.dynamic_choices.get(name)
    if folder is None:
        return spec
    return (choices(folder), *spec[1:])


def object_info(node: NodeClass, choices: Callable[[str], list[str]]) -> dict[str, Any]:
    """``GET /object_info`` entry of one class (ComfyUI's ``node_info``)."""
    required = {name: list(input_spec(node, name, choices)) for name in node.required}
    info: dict[str, Any] = {
        "input": {"required": required},
        "input_order": {"required": list(node.required)},
        "output": list(node.returns),
        "output_is_list": [False] * len(node.returns),
        "output_name": list(node.return_names or node.returns),
        "name": node.name,
        "display_name": node.display_name,
        "description": "",
        "python_module": "nodes",
        "category": node.category,
        "output_node": node.output_node,
    }
    if node.hidden:
        info["input"]["hidden"] = dict(node.hidden)
        info["input_order"]["hidden"] = list(node.hidden)
    return info
