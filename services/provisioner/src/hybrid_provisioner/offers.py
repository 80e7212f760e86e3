"""Choosing offers: a profile's policy as a Vast search, re-checked locally, cheapest adequate first.

vastai-api.md "What the well-run peers do": filter on ``direct_port_count ≥ ports needed``, ``rentable``,
``rented=false``, ``verified``, a reliability floor and a CUDA floor; sizes are MB (GB × 1000) and numbers may be
compared as strings by the API, so every filter is applied again here on the offers it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hybrid_common.messages.domain import OfferSummary
from hybrid_provisioner.profiles import OfferPolicy, WorkloadProfile
from hybrid_provisioner.vast import VastClient


@dataclass(frozen=True)
class Offer:
    id: int
    machine_id: int
    gpu_name: str
    num_gpus: int
    gpu_ram_mb: float
    dph_total: float
    reliability: float
    inet_down: float
    direct_port_count: int
    disk_space: float
    cuda: float | None
    geolocation: str | None
    raw: dict[str, Any]

    @classmethod
    def parse(cls, row: dict[str, Any]) -> Offer:
        def num(key: str, default: float = 0.0) -> float:
            value = row.get(key)
            try:
                return float(value) if value is not None else default
            except (TypeError, ValueError):
                return default

        cuda = row.get("cuda_max_good")
        return cls(
            id=int(row["id"]),
            machine_id=int(row.get("machine_id") or 0),
            gpu_name=str(row.get("gpu_name") or "?"),
            num_gpus=int(num("num_gpus", 1)),
            gpu_ram_mb=num("gpu_ram"),
            dph_total=num("dph_total"),
            reliability=num("reliability2", num("reliability")),
            inet_down=num("inet_down"),
            direct_port_count=int(num("direct_port_count")),
            disk_space=num("disk_space"),
            cuda=float(cuda) if isinstance(cuda, (int, float)) else None,
            geolocation=row.get("geolocation"),
            raw=row,
        )

    def summary(self, minutes: float | None = None) -> OfferSummary:
        return OfferSummary(
            offer_id=self.id,
            machine_id=self.machine_id,
            gpu_name=self.gpu_name,
            num_gpus=self.num_gpus,
            gpu_ram_mb=self.gpu_ram_mb,
            dph_total=self.dph_total,
            reliability=self.reliability,
            inet_down_mbps=self.inet_down,
            direct_port_count=self.direct_port_count,
            geolocation=self.geolocation,
            estimated_cost_usd=round(self.dph_total * minutes / 60.0, 4) if minutes is not None else None,
        )


def search_query(profile: WorkloadProfile, policy: OfferPolicy) -> dict[str, Any]:
    q: dict[str, Any] = {
        "verified": {"eq": policy.verified},
        "external": {"eq": False},
        "rentable": {"eq": True},
        "rented": {"eq": False},
        "num_gpus": {"gte": policy.min_gpus, "lte": policy.max_gpus},
        "gpu_ram": {"gte": policy.min_vram_gb * 1000.0},
        "direct_port_count": {"gte": len(profile.ports)},
        "reliability2": {"gte": policy.min_reliability},
        "disk_space": {"gte": profile.disk_gb},
        "dph_total": {"lte": policy.max_dph},
        "order": [["dph_total", "asc"]],
        "type": policy.offer_type,
        "limit": policy.search_limit,
        "allocated_storage": profile.disk_gb,
    }
    if not policy.verified:
        del q["verified"]
    if policy.gpu_names:
        q["gpu_name"] = {"in": list(policy.gpu_names)}
    if policy.min_total_vram_gb:
        q["gpu_total_ram"] = {"gte": policy.min_total_vram_gb * 1000.0}
    if policy.min_cuda is not None:
        q["cuda_max_good"] = {"gte": policy.min_cuda}
    if policy.min_inet_down_mbps is not None:
        q["inet_down"] = {"gte": policy.min_inet_down_mbps}
    if policy.exclude_machine_ids:
        q["machine_id"] = {"notin": list(policy.exclude_machine_ids)}
    return q


def adequate(offer: Offer, profile: WorkloadProfile, policy: OfferPolicy) -> bool:
    raw = offer.raw
    if raw.get("rentable") is False or raw.get("rented") is True or raw.get("external") is True:
        return False
    if policy.verified and raw.get("verified") is False:
        return False
    if policy.gpu_names and offer.gpu_name not in policy.gpu_names:
        return False
    if not policy.min_gpus <= offer.num_gpus <= policy.max_gpus:
        return False
    # Vast's MB are "GB × 1000" in queries but real per-GPU figures (24564 for a 24 GB card): allow 3 % slack.
    if offer.gpu_ram_mb < policy.min_vram_gb * 1000.0 * 0.97:
        return False
    if policy.min_total_vram_gb and offer.gpu_ram_mb * offer.num_gpus < policy.min_total_vram_gb * 1000.0 * 0.97:
        return False
    if offer.direct_port_count < len(profile.ports):
        return False
    if offer.reliability < policy.min_reliability or offer.dph_total > policy.max_dph:
        return False
    if offer.disk_space and offer.disk_space < profile.disk_gb:
        return False
    if policy.min_cuda is not None and (offer.cuda is None or offer.cuda < policy.min_cuda):
        return False
    return offer.machine_id not in policy.exclude_machine_ids


async def find_offers(
    vast: VastClient, profile: WorkloadProfile, policy: OfferPolicy, *, exclude_offers: set[int] | None = None
) -> list[Offer]:
    """Adequate offers, cheapest first (ties: more reliable first)."""
    rows = await vast.search_offers(search_query(profile, policy))
    offers = [Offer.parse(r) for r in rows if isinstance(r.get("id"), int)]
    fit = [o for o in offers if adequate(o, profile, policy) and o.id not in (exclude_offers or set())]
    fit.sort(key=lambda o: (o.dph_total, -o.reliability, o.id))
    return fit
