"""What outlives a ComfyUI restart on the rented box: its disk (models, input/output files), its GPU,
and the simulator's fault switches. A :class:`~sim.comfyui.process.ComfyProcess` is one boot of ComfyUI
on this machine; queue, history, caches and sockets belong to the process and die with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hybrid_common import TimeProfile
from sim.comfyui.files import ComfyFiles
from sim.comfyui.validation import MachineView

# Model folders of ComfyUI (folder_paths) with what a fresh vastai/comfy box typically carries.
DEFAULT_MODELS: dict[str, list[str]] = {
    "checkpoints": ["sd_xl_base_1.0.safetensors", "v1-5-pruned-emaonly-fp16.safetensors"],
    "loras": ["add-detail-xl.safetensors"],
    "vae": ["sdxl_vae.safetensors"],
    "clip": [],
    "clip_vision": [],
    "controlnet": [],
    "diffusion_models": [],
    "embeddings": [],
    "upscale_models": ["RealESRGAN_x4plus.pth"],
}


@dataclass(frozen=True)
class GpuInfo:
    name: str = "NVIDIA GeForce RTX 4090"
    vram_total: int = 25_386_352_640  # what torch reports for a 24 GB card

    @property
    def pixel_budget(self) -> int:
        """Latent pixels (width x height x batch) one sampling pass fits in before running out of memory."""
        return int(self.vram_total / 2**30 * 400_000)


@dataclass
class FaultPlan:
    oom_remaining: int = 0  # the next N prompts fail with a CUDA OOM
    restart_after_progress: int | None = None  # restart when a running job reports this many steps
    restart_downtime_s: float | None = None  # real seconds, scaled by the profile


class ComfyMachine:
    def __init__(
        self, root: Path, *, models: dict[str, list[str]], gpu: GpuInfo, profile: TimeProfile, seed: int
    ) -> None:
        self.root = root
        self.files = ComfyFiles(root)
        self.models = {folder: sorted(names) for folder, names in models.items()}
        self.gpu = gpu
        self.profile = profile
        self.seed = seed
        self.faults = FaultPlan()
        self.prompts_executed = 0
        self.restart_hook: Callable[[], None] | None = None

    def choices(self, folder: str) -> list[str]:
        if folder == "@input":
            return self.files.input_images()
        return list(self.models.get(folder, []))

    def view(self) -> MachineView:
        return MachineView(choices=self.choices, input_exists=self.files.input_exists)

    def add_model(self, folder: str, name: str) -> None:
        names = self.models.setdefault(folder, [])
        if name not in names:
            names.append(name)
            names.sort()

    def remove_model(self, folder: str, name: str) -> None:
        if name in self.models.get(folder, []):
            self.models[folder].remove(name)

    def take_oom(self) -> bool:
        if self.faults.oom_remaining > 0:
            self.faults.oom_remaining -= 1
            return True
        return False

    def progress_reached(self, steps_done: int) -> None:
        """Called by the executor on every sampling step: fires an armed mid-job restart."""
        at = self.faults.restart_after_progress
        if at is not None and steps_done >= at and self.restart_hook is not None:
            self.faults.restart_after_progress = None
            self.restart_hook()
