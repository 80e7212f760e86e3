"""Running one queued prompt the way ComfyUI's PromptExecutor does, with simulated GPU time.

Message sequence per prompt (comfyui.md, ComfyUI ``execution.py``): ``execution_start``, ``execution_cached``,
then per node ``executing`` (+ ``progress`` per sampling step, ``executed`` for nodes with UI output), then
``execution_success`` | ``execution_error`` | ``execution_interrupted``. The final ``executing`` with
``node: null`` is sent by the worker *after* the history is stored (see process.py).
``execution_*`` status messages carry a ``timestamp`` and are kept in the history's ``status.messages``.

Caching is ComfyUI's default: a node whose inputs (recursively) are unchanged since the previous prompt is
not re-run and is listed in ``execution_cached`` — re-queueing an identical prompt executes nothing and
returns the previous outputs. Durations are real-GPU seconds (an RTX 4090-class card) scaled by the time
profile; faults: CUDA OOM (injected, or when width x height x batch exceeds the card), LoadImage on a
file that is not an image, interrupts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sim.comfyui.images import png_size, render_png
from sim.comfyui.machine import ComfyMachine
from sim.comfyui.sockets import SocketHub

# Real seconds on the GPU (scaled by the profile when simulated).
CHECKPOINT_LOAD_S = 6.0
SMALL_LOADER_S = 0.6
TEXT_ENCODE_S = 0.05
STEP_BASE_S = 0.04
STEP_PER_MEGAPIXEL_S = 0.11
VAE_BASE_S = 0.05
VAE_PER_MEGAPIXEL_S = 0.15
SAVE_PER_IMAGE_S = 0.05
# Nodes that allocate the big tensors: an injected OOM strikes the first of these that runs.
_GPU_HEAVY = frozenset({"KSampler", "VAEDecode", "VAEEncode", "ImageScale"})
# torch with cudaMallocAsync (the allocator /system_stats shows) words its OOM like this; ComfyUI appends tips.
OOM_TYPE = "torch.OutOfMemoryError"
OOM_MESSAGE = (
    "Allocation on device \nThis error means you ran out of memory on your GPU.\n\n"
    "TIPS: If the workflow worked before you might have accidentally set the batch_size to a large number."
)


class Interrupted(Exception):
    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self.node_id = node_id


class NodeFailure(Exception):
    def __init__(self, node_id: str, exception_type: str, message: str) -> None:
        super().__init__(message)
        self.node_id = node_id
        self.exception_type = exception_type
        self.message = message


@dataclass
class ExecutionResult:
    success: bool
    status_messages: list[list[Any]]
    outputs: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _megapixels(value: dict[str, Any]) -> float:
    return float(value["w"] * value["h"] * value["batch"]) / (1024 * 1024)


def _format_input(value: Any) -> Any:
    if value is None or isinstance(value, int | float | bool | str):
        return value
    return f"<{value.get('kind', 'object')} object>" if isinstance(value, dict) else str(value)


class PromptExecutor:
    def __init__(self, machine: ComfyMachine, hub: SocketHub) -> None:
        self.machine = machine
        self.hub = hub
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.interrupt_flag = False
        self._outputs: dict[str, tuple[Any, ...]] = {}  # signature -> node outputs (previous prompt)
        self._ui: dict[str, dict[str, Any]] = {}  # signature -> UI output

    # -- messages ------------------------------------------------------------------------------------

    def _send(self, event: str, data: dict[str, Any]) -> None:
        self.hub.send_sync(event, data, self.client_id)

    def _add_message(self, messages: list[list[Any]], event: str, data: dict[str, Any], broadcast: bool) -> None:
        data = {**data, "timestamp": _now_ms()}
        messages.append([event, data])
        if self.client_id is not None or broadcast:
            self.hub.send_sync(event, data, self.client_id)

    # -- graph ---------------------------------------------------------------------------------------

    @staticmethod
    def _order(prompt: dict[str, Any], outputs: list[str]) -> list[str]:
        order: list[str] = []
        seen: set[str] = set()

        def visit(node_id: str) -> None:
            if node_id in seen:
                return
            seen.add(node_id)
            for value in prompt[node_id].get("inputs", {}).values():
                if isinstance(value, list) and len(value) == 2:
                    visit(str(value[0]))
            order.append(node_id)

        for o in outputs:
            visit(o)
        return order

    def _signatures(self, prompt: dict[str, Any], order: list[str]) -> dict[str, str]:
        sigs: dict[str, str] = {}
        for node_id in order:
            node = prompt[node_id]
            parts: dict[str, Any] = {}
            for name, value in sorted(node.get("inputs", {}).items()):
                if isinstance(value, list) and len(value) == 2:
                    parts[name] = ["link", sigs[str(value[0])], value[1]]
                else:
                    parts[name] = value
            # stdlib json: inputs may hold integers beyond 64 bits, which orjson refuses.
            material = json.dumps([node["class_type"], parts], sort_keys=True, default=str).encode()
            sigs[node_id] = hashlib.blake2b(material, digest_size=12).hexdigest()
        return sigs

    # -- time ------------------------------------------------------------------------------------------

    async def _work(self, node_id: str, real_seconds: float) -> None:
        await asyncio.sleep(self.machine.profile.scale(real_seconds))
        if self.interrupt_flag:
            raise Interrupted(node_id)

    # -- one prompt ----------------------------------------------------------------------------------

    async def execute(
        self, prompt: dict[str, Any], prompt_id: str, extra_data: dict[str, Any], execute_outputs: list[str]
    ) -> ExecutionResult:
        self.interrupt_flag = False
        self.client_id = extra_data.get("client_id")
        messages: list[list[Any]] = []
        self._add_message(messages, "execution_start", {"prompt_id": prompt_id}, broadcast=False)
        order = self._order(prompt, execute_outputs)
        sigs = self._signatures(prompt, order)
        cached = [n for n in order if sigs[n] in self._outputs]
        self._add_message(messages, "execution_cached", {"nodes": cached, "prompt_id": prompt_id}, broadcast=False)

        values: dict[str, tuple[Any, ...]] = {}
        new_outputs: dict[str, tuple[Any, ...]] = {}
        new_ui: dict[str, dict[str, Any]] = {}
        ui_outputs: dict[str, Any] = {}
        executed: list[str] = []
        success = False
        try:
            for node_id in order:
                sig = sigs[node_id]
                if sig in self._outputs:
                    values[node_id] = new_outputs[sig] = self._outputs[sig]
                    ui = self._ui.get(sig)
                    if ui is not None:
                        new_ui[sig] = ui_outputs[node_id] = ui
                        if self.client_id is not None:
                            self._send(
                                "executed",
                                {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": prompt_id},
                            )
                    continue
                if self.interrupt_flag:
                    raise Interrupted(node_id)
                self.last_node_id = node_id
                self._send("executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id})
                class_type = prompt[node_id]["class_type"]
                # An injected OOM strikes the first heavy node that really runs (cached nodes allocate nothing).
                if (class_type in _GPU_HEAVY or node_id == order[-1]) and self.machine.take_oom():
                    raise NodeFailure(node_id, OOM_TYPE, OOM_MESSAGE)
                outputs, ui = await self._run(node_id, sig, prompt, values, prompt_id, extra_data)
                values[node_id] = new_outputs[sig] = outputs
                if ui is not None:
                    new_ui[sig] = ui_outputs[node_id] = ui
                    if self.client_id is not None:
                        self._send(
                            "executed",
                            {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": prompt_id},
                        )
                executed.append(node_id)
            success = True
        except Interrupted as stop:
            self._add_message(
                messages,
                "execution_interrupted",
                {
                    "prompt_id": prompt_id,
                    "node_id": stop.node_id,
                    "node_type": prompt[stop.node_id]["class_type"],
                    "executed": executed,
                },
                broadcast=True,
            )
        except NodeFailure as failure:
            node = prompt[failure.node_id]
            self._add_message(
                messages,
                "execution_error",
                {
                    "prompt_id": prompt_id,
                    "node_id": failure.node_id,
                    "node_type": node["class_type"],
                    "executed": executed,
                    "exception_message": failure.message,
                    "exception_type": failure.exception_type,
                    "traceback": [
                        '  File "/workspace/ComfyUI/execution.py", line 496, in execute\n'
                        "    output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data(...)\n",
                        f'  File "/workspace/ComfyUI/nodes.py", line 1, in {node["class_type"]}\n',
                    ],
                    "current_inputs": {
                        k: [_format_input(self._resolve(v, values))] for k, v in node.get("inputs", {}).items()
                    },
                    "current_outputs": list(values),
                },
                broadcast=False,
            )
        else:
            self._add_message(messages, "execution_success", {"prompt_id": prompt_id}, broadcast=False)
        finally:
            self._outputs, self._ui = new_outputs, new_ui
        self.machine.prompts_executed += 1
        meta = {n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n} for n in ui_outputs}
        return ExecutionResult(success, messages, ui_outputs, meta)

    @staticmethod
    def _resolve(value: Any, values: dict[str, tuple[Any, ...]]) -> Any:
        if isinstance(value, list) and len(value) == 2 and str(value[0]) in values:
            return values[str(value[0])][value[1]]
        return value

    async def _run(
        self,
        node_id: str,
        sig: str,
        prompt: dict[str, Any],
        values: dict[str, tuple[Any, ...]],
        prompt_id: str,
        extra_data: dict[str, Any],
    ) -> tuple[tuple[Any, ...], dict[str, Any] | None]:
        node = prompt[node_id]
        class_type = node["class_type"]
        args = {k: self._resolve(v, values) for k, v in node.get("inputs", {}).items()}
        budget = self.machine.gpu.pixel_budget

        if class_type == "CheckpointLoaderSimple":
            await self._work(node_id, CHECKPOINT_LOAD_S)
            name = args["ckpt_name"]
            return (
                {"kind": "MODEL", "ckpt": name},
                {"kind": "CLIP", "ckpt": name},
                {"kind": "VAE", "name": name},
            ), None
        if class_type == "LoraLoader":
            await self._work(node_id, SMALL_LOADER_S)
            return (dict(args["model"], lora=args["lora_name"]), args["clip"]), None
        if class_type == "VAELoader":
            await self._work(node_id, SMALL_LOADER_S)
            return ({"kind": "VAE", "name": args["vae_name"]},), None
        if class_type == "CLIPTextEncode":
            await self._work(node_id, TEXT_ENCODE_S)
            return ({"kind": "CONDITIONING", "text": args["text"]},), None
        if class_type == "EmptyLatentImage":
            latent = {
                "kind": "LATENT",
                "w": args["width"],
                "h": args["height"],
                "batch": args["batch_size"],
                "sig": sig,
            }
            return (latent,), None
        if class_type == "LoadImage":
            await self._work(node_id, TEXT_ENCODE_S)
            path = self.machine.files.input_path(args["image"])
            if not self.machine.files.is_image(path):
                raise NodeFailure(node_id, "PIL.UnidentifiedImageError", f"cannot identify image file '{path}'")
            w, h = png_size(path.read_bytes()[:32]) or (512, 512)
            loaded = {"kind": "IMAGE", "w": w, "h": h, "batch": 1, "sig": sig}
            return (loaded, {"kind": "MASK", "w": w, "h": h, "batch": 1}), None
        if class_type == "KSampler":
            latent = args["latent_image"]
            if latent["w"] * latent["h"] * latent["batch"] > budget:
                raise NodeFailure(node_id, OOM_TYPE, OOM_MESSAGE)
            await self._sample(node_id, int(args["steps"]), _megapixels(latent), prompt_id)
            return (dict(latent, sig=sig),), None
        if class_type in ("VAEDecode", "VAEEncode"):
            source = args["samples" if class_type == "VAEDecode" else "pixels"]
            if source["w"] * source["h"] * source["batch"] > budget:
                raise NodeFailure(node_id, OOM_TYPE, OOM_MESSAGE)
            await self._work(node_id, VAE_BASE_S + VAE_PER_MEGAPIXEL_S * _megapixels(source))
            kind = "IMAGE" if class_type == "VAEDecode" else "LATENT"
            return (dict(source, kind=kind, sig=sig),), None
        if class_type == "ImageScale":
            image: dict[str, Any] = dict(args["image"])
            image["w"] = args["width"] or image["w"]
            image["h"] = args["height"] or image["h"]
            if image["w"] * image["h"] * image["batch"] > budget:
                raise NodeFailure(node_id, OOM_TYPE, OOM_MESSAGE)
            await self._work(node_id, VAE_BASE_S)
            return (dict(image, sig=sig),), None
        if class_type in ("SaveImage", "PreviewImage"):
            return (), await self._save(node_id, class_type, args, prompt, extra_data, sig)
        raise NodeFailure(node_id, "NotImplementedError", f"{class_type} has no simulated implementation")

    async def _sample(self, node_id: str, steps: int, megapixels: float, prompt_id: str) -> None:
        step_s = self.machine.profile.scale(STEP_BASE_S + STEP_PER_MEGAPIXEL_S * megapixels)
        loop = asyncio.get_running_loop()
        started = loop.time()
        for i in range(1, steps + 1):
            if self.interrupt_flag:
                raise Interrupted(node_id)
            wait = started + i * step_s - loop.time()
            await asyncio.sleep(max(wait, 0.0))
            self._send("progress", {"value": i, "max": steps, "prompt_id": prompt_id, "node": node_id})
            self.machine.progress_reached(i)

    async def _save(
        self,
        node_id: str,
        class_type: str,
        args: dict[str, Any],
        prompt: dict[str, Any],
        extra_data: dict[str, Any],
        sig: str,
    ) -> dict[str, Any]:
        images = args["images"]
        files = self.machine.files
        if class_type == "SaveImage":
            type_, prefix = "output", str(args.get("filename_prefix", "ComfyUI"))
        else:
            suffix = "".join("abcdefghijklmnopqrstupvxyz"[int(c, 16)] for c in sig[:5])
            type_, prefix = "temp", f"ComfyUI_temp_{suffix}"
        try:
            folder, name, counter, subfolder = files.save_image_path(prefix, type_)
        except ValueError as e:
            raise NodeFailure(node_id, "Exception", str(e)) from None
        text = {"prompt": json.dumps(prompt, default=str)}
        for key, value in (extra_data.get("extra_pnginfo") or {}).items():
            text[key] = json.dumps(value, default=str)
        results = []
        for batch_number in range(images["batch"]):
            filename = f"{name.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
            seed = hashlib.blake2b(f"{images['sig']}:{batch_number}:{self.machine.seed}".encode()).digest()
            png = render_png(images["w"], images["h"], seed, text)
            Path(folder, filename).write_bytes(png)
            results.append({"filename": filename, "subfolder": subfolder, "type": type_})
            counter += 1
            await self._work(node_id, SAVE_PER_IMAGE_S)
        return {"images": results}
