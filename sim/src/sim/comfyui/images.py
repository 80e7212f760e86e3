"""Deterministic PNG output: a gradient whose colours come from the job's signature.

ComfyUI's SaveImage writes PNGs with the API prompt (and any ``extra_pnginfo`` such as the UI workflow)
in ``tEXt`` chunks; clients read those back, so the simulator writes them too. Rows differ only by colour,
so even 1024x1024 images compress to a few kilobytes and encode in milliseconds.
"""

from __future__ import annotations

import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Magic numbers of formats PIL opens (what LoadImage would accept).
_IMAGE_MAGIC = (PNG_SIGNATURE, b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def render_png(width: int, height: int, seed: bytes, text: dict[str, str] | None = None) -> bytes:
    r0, g0, b0, dr, dg, db = (seed + bytes(6))[:6]
    rows = bytearray()
    for y in range(height):
        pixel = bytes(((r0 + y * (dr | 1)) & 0xFF, (g0 + y * (dg | 1) // 2) & 0xFF, (b0 + y * (db | 1) // 3) & 0xFF))
        rows += b"\x00" + pixel * width
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    chunks = [_chunk(b"IHDR", ihdr)]
    for key, value in (text or {}).items():
        chunks.append(_chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1", "replace")))
    chunks.append(_chunk(b"IDAT", zlib.compress(bytes(rows), 4)))
    chunks.append(_chunk(b"IEND", b""))
    return PNG_SIGNATURE + b"".join(chunks)


def looks_like_image(head: bytes) -> bool:
    return head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def png_size(data: bytes) -> tuple[int, int] | None:
    if data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    return None
