"""The machine's ComfyUI folders — input, output, temp — and ComfyUI's rules for reaching them.

Rules from ComfyUI's ``server.py`` and ``folder_paths.py`` (comfyui.md):
- ``/upload/image``: a file field named ``image`` with a filename (else 400); ``type`` input|temp|output;
  ``overwrite`` "true"/"1"; without it, the same content reuses the name and different content becomes
  ``name (1).ext``; a path escaping the folder is a 400.
- ``/view``: 400 when the filename starts with "/" or contains "..", 403 when ``subfolder`` escapes the
  folder, 404 when missing. Names may carry an annotation: ``"x.png [output]"``.
- SaveImage names files ``{prefix}_{counter:05}_.png``, the counter one above the highest existing one.
Files live on disk under ``root/ComfyUI/{input,output,temp}`` and survive a ComfyUI restart, except temp,
which ComfyUI empties at start-up.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from sim.comfyui.images import looks_like_image

_IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


class UploadRefused(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class ComfyFiles:
    def __init__(self, root: Path) -> None:
        base = root / "ComfyUI"
        self.input_dir = str((base / "input").resolve())
        self.output_dir = str((base / "output").resolve())
        self.temp_dir = str((base / "temp").resolve())
        for d in (self.input_dir, self.output_dir, self.temp_dir):
            Path(d).mkdir(parents=True, exist_ok=True)

    def directory(self, type_: str) -> str | None:
        return {"input": self.input_dir, "output": self.output_dir, "temp": self.temp_dir}.get(type_)

    def clear_temp(self) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        Path(self.temp_dir).mkdir(parents=True, exist_ok=True)

    # -- folder_paths ---------------------------------------------------------------------------

    def annotated(self, name: str) -> tuple[str, str | None]:
        for tag, type_ in ((" [output]", "output"), (" [input]", "input"), (" [temp]", "temp")):
            if name.endswith(tag):
                return name[: -len(tag)], self.directory(type_)
        return name, None

    def input_exists(self, name: str) -> bool:
        plain, base = self.annotated(name)
        return Path(base or self.input_dir, plain).exists()

    def input_path(self, name: str) -> Path:
        plain, base = self.annotated(name)
        return Path(base or self.input_dir, plain)

    def input_images(self) -> list[str]:
        """LoadImage's choices: image files directly in the input folder, sorted."""
        return sorted(
            e.name
            for e in os.scandir(self.input_dir)
            if e.is_file() and Path(e.name).suffix.lower() in _IMAGE_EXTENSIONS
        )

    # -- /upload/image ----------------------------------------------------------------------------

    def save_upload(
        self, filename: str, content: bytes, *, type_: str | None, subfolder: str, overwrite: bool
    ) -> dict[str, str]:
        type_ = type_ or "input"
        upload_dir = self.directory(type_)
        if upload_dir is None:
            # ComfyUI's get_dir_by_type leaves the directory unset: an UnboundLocalError, i.e. a 500.
            raise UploadRefused(500)
        if not filename:
            raise UploadRefused(400)
        folder = os.path.join(upload_dir, os.path.normpath(subfolder))
        filepath = os.path.abspath(os.path.join(folder, filename))
        if os.path.commonpath((upload_dir, filepath)) != upload_dir:
            raise UploadRefused(400)
        Path(folder).mkdir(parents=True, exist_ok=True)
        stem, ext = os.path.splitext(filename)
        duplicate = False
        if not overwrite:
            i = 1
            digest = hashlib.sha256(content).digest()
            while os.path.exists(filepath):
                if hashlib.sha256(Path(filepath).read_bytes()).digest() == digest:
                    duplicate = True
                    break
                filename = f"{stem} ({i}){ext}"
                filepath = os.path.join(folder, filename)
                i += 1
        if not duplicate:
            Path(filepath).write_bytes(content)
        return {"name": filename, "subfolder": subfolder, "type": type_}

    # -- /view --------------------------------------------------------------------------------------

    def view_path(self, filename: str, type_: str | None, subfolder: str | None) -> Path | int:
        """The file ``/view`` serves, or the HTTP status ComfyUI answers instead."""
        filename, base = self.annotated(filename)
        if not filename:
            return 400
        if filename[0] == "/" or ".." in filename:
            return 400
        if base is None:
            base = self.directory(type_ or "output")
        if base is None:
            return 400
        if subfolder is not None:
            full = os.path.join(base, subfolder)
            if os.path.commonpath((os.path.abspath(full), base)) != base:
                return 403
            base = full
        path = Path(base, os.path.basename(filename))
        return path if path.is_file() else 404

    # -- SaveImage ------------------------------------------------------------------------------------

    def save_image_path(self, prefix: str, type_: str = "output") -> tuple[str, str, int, str]:
        """(folder, filename base, first free counter, subfolder) — folder_paths.get_save_image_path."""
        base = self.directory(type_)
        assert base is not None
        subfolder = os.path.dirname(os.path.normpath(prefix))
        name = os.path.basename(os.path.normpath(prefix))
        folder = os.path.join(base, subfolder)
        if os.path.commonpath((base, os.path.abspath(folder))) != base:
            raise ValueError(
                "**** ERROR: Saving image outside the output folder is not allowed."
                f"\n full_output_folder: {os.path.abspath(folder)}\n         output_dir: {base}"
            )
        Path(folder).mkdir(parents=True, exist_ok=True)
        counter = 0
        for entry in os.listdir(folder):
            head = entry[: len(name) + 1]
            if os.path.normcase(head[:-1]) != os.path.normcase(name) or head[-1:] != "_":
                continue
            try:
                counter = max(counter, int(entry[len(name) + 1 :].split("_")[0]))
            except ValueError:
                continue
        return folder, name, counter + 1, subfolder

    @staticmethod
    def is_image(path: Path) -> bool:
        with path.open("rb") as f:
            return looks_like_image(f.read(16))
