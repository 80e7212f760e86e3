"""Which callback route a request path names, and the path the dapi is given.

MLNodes build the URL from ``DAPI_API__POC_CALLBACK_URL`` (gonka-protocol.md §2, §7):
- v1: ``{base}/v1/poc-batches/generated|validated``; the dapi also serves ``/mlnode/v1/...``;
- v2: ``{base}/v2/poc-batches/generated|validated``, from v0.2.12 ``{base}/v2/poc-batches/<model id>/...`` with the
  model id escaped twice — so the raw (still percent-encoded) path is parsed and forwarded byte for byte;
- an MLNode-style version prefix (``/v3.0.8/v1/...``, as the dapi addresses nodes, §1) is accepted and dropped:
  the dapi's callback server has no such routes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from hybrid_common.messages.domain import PocGeneration

_ROUTE: Final = re.compile(
    r"^(?:/(?P<version>v\d+\.\d+[A-Za-z0-9._-]*))?"
    r"(?:(?P<v1>/(?:mlnode/)?v1/poc-batches)|(?P<v2>/v2/poc-batches(?:/(?P<model>[^/]+))?))"
    r"/(?P<kind>generated|validated)/?$"
)


@dataclass(frozen=True, slots=True)
class CallbackRoute:
    generation: PocGeneration
    kind: str  # generated | validated
    dapi_path: str  # what the forwarder posts to, relative to DAPI_CALLBACK_URL
    model: str | None = None  # v2 model segment, still escaped as received

    @property
    def key(self) -> str:
        """The route's identity for deduplication: aliases and version prefixes of one route are one route."""
        return f"{self.generation}|{self.model or ''}|{self.kind}"


def parse_route(raw_path: str) -> CallbackRoute | None:
    """The route of ``raw_path`` (query string already removed), or None for anything else."""
    m = _ROUTE.match(raw_path)
    if m is None:
        return None
    kind = m["kind"]
    if m["v1"] is not None:
        return CallbackRoute("v1", kind, f"{m['v1']}/{kind}")
    model = m["model"]
    path = f"/v2/poc-batches/{model}/{kind}" if model else f"/v2/poc-batches/{kind}"
    return CallbackRoute("v2", kind, path, model)
