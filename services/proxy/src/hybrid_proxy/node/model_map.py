"""The model-name map: the dapi's model id ↔ the upstream's name for the same model.

Only the ``"model": "..."`` string is rewritten, in place, on the raw bytes: every other byte of the request and of
the upstream's answer stays exactly as it was (issue #9: no per-chunk JSON re-serialization; inference-proxy.md:
re-serializing every chunk is what makes LiteLLM slow). A ``"model"`` inside a prompt cannot match: inside a JSON
string its quotes are escaped (``\\"model\\"``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import orjson


def _json_text(name: str) -> bytes:
    """The name as it appears between the quotes of a JSON string."""
    return orjson.dumps(name)[1:-1]


def _pattern(names: list[str]) -> re.Pattern[bytes]:
    variants: list[bytes] = []
    for name in sorted(names, key=len, reverse=True):  # longest first: a name may prefix another
        text = _json_text(name)
        variants.append(re.escape(text))
        if b"/" in text:  # some encoders escape "/" as "\/"
            variants.append(re.escape(text.replace(b"/", b"\\/")))
    return re.compile(rb'("model"\s*:\s*")(' + b"|".join(variants) + rb')"')


class _Direction:
    __slots__ = ("_pattern", "_targets")

    def __init__(self, mapping: Mapping[str, str]) -> None:
        self._targets: dict[bytes, bytes] = {}
        for src, dst in mapping.items():
            text = _json_text(src)
            self._targets[text] = _json_text(dst)
            self._targets[text.replace(b"/", b"\\/")] = _json_text(dst)
        self._pattern = _pattern(list(mapping))

    def _sub(self, m: re.Match[bytes]) -> bytes:
        return m.group(1) + self._targets[m.group(2)] + b'"'

    def first(self, data: bytes) -> bytes:
        return self._pattern.sub(self._sub, data, count=1)

    def every(self, data: bytes) -> bytes:
        return self._pattern.sub(self._sub, data)


class ModelMap:
    """``dapi → upstream`` for requests, ``upstream → dapi`` for answers. Empty map = identity (and ``bool`` false)."""

    def __init__(self, dapi_to_upstream: Mapping[str, str]) -> None:
        self.dapi_to_upstream = {k: v for k, v in dapi_to_upstream.items() if k != v}
        self.upstream_to_dapi = {v: k for k, v in self.dapi_to_upstream.items()}
        self._request = _Direction(self.dapi_to_upstream) if self.dapi_to_upstream else None
        self._response = _Direction(self.upstream_to_dapi) if self.dapi_to_upstream else None

    def __bool__(self) -> bool:
        return self._request is not None

    def upstream_name(self, dapi_name: str) -> str:
        return self.dapi_to_upstream.get(dapi_name, dapi_name)

    def dapi_name(self, upstream_name: str) -> str:
        return self.upstream_to_dapi.get(upstream_name, upstream_name)

    def request(self, body: bytes) -> bytes:
        """The request body with its top-level model id renamed for the upstream."""
        return self._request.first(body) if self._request is not None else body

    def response(self, data: bytes) -> bytes:
        """Upstream bytes (a JSON body or complete SSE lines) with every model string renamed for the dapi."""
        return self._response.every(data) if self._response is not None else data
