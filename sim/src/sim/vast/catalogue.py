"""The simulated marketplace: a seeded catalogue of a few hundred varied offers.

Field names and units follow vastai-api.md "Offer search": ``gpu_ram`` in MB per GPU, ``cpu_ram`` in MB,
``disk_space`` in GB, ``dph_*`` in $/h, ``storage_cost`` in $/GB/month, ``cuda_max_good`` a float.
Some offers are unverified, external, already rented, or have no direct ports — the filters a careful
provisioner applies must matter.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Final

HOURS_PER_MONTH: Final = 30 * 24


@dataclass(frozen=True)
class GpuModel:
    name: str
    vram_mb: int
    dph_per_gpu: float  # typical on-demand $/h per GPU
    compute_cap: int
    tflops: float
    dlperf: float
    mem_bw: float


GPU_MODELS: Final[tuple[GpuModel, ...]] = (
    GpuModel("RTX 3060", 12288, 0.06, 860, 12.7, 6.1, 360.0),
    GpuModel("RTX 3090", 24576, 0.20, 860, 35.6, 17.0, 936.0),
    GpuModel("RTX 4080", 16376, 0.22, 890, 48.7, 22.0, 717.0),
    GpuModel("RTX 4090", 24564, 0.35, 890, 82.6, 36.0, 1008.0),
    GpuModel("RTX 5090", 32607, 0.65, 1200, 104.8, 48.0, 1792.0),
    GpuModel("RTX A6000", 49140, 0.45, 860, 38.7, 19.5, 768.0),
    GpuModel("A40", 46068, 0.40, 860, 37.4, 18.5, 696.0),
    GpuModel("L40S", 46068, 0.75, 890, 91.6, 40.0, 864.0),
    GpuModel("Tesla V100", 16384, 0.15, 700, 15.7, 10.0, 900.0),
    GpuModel("A100 PCIE", 40960, 0.80, 800, 19.5, 30.0, 1555.0),
    GpuModel("A100 SXM4", 81920, 1.10, 800, 19.5, 33.0, 2039.0),
    GpuModel("H100 PCIE", 81559, 1.80, 900, 51.2, 55.0, 2039.0),
    GpuModel("H100 SXM", 81559, 2.20, 900, 66.9, 70.0, 3350.0),
    GpuModel("H200", 143771, 3.00, 900, 66.9, 75.0, 4800.0),
    GpuModel("B200", 183359, 4.50, 1000, 80.0, 110.0, 8000.0),
)
GPU_BY_NAME: Final = {g.name: g for g in GPU_MODELS}

_PLACES: Final = (
    "Texas, US",
    "California, US",
    "Oregon, US",
    "Quebec, CA",
    "Ontario, CA",
    "Hesse, DE",
    "North Holland, NL",
    "Stockholm, SE",
    "Île-de-France, FR",
    "England, GB",
    "Warsaw, PL",
    "Bucharest, RO",
    "Taipei, TW",
    "Tokyo, JP",
    "Seoul, KR",
    "Hanoi, VN",
    "Sichuan, CN",
    "New South Wales, AU",
    "São Paulo, BR",
    "Moscow, RU",
)


@dataclass
class Offer:
    """One rentable bundle on one machine. ``id`` is what ``PUT /asks/{id}/`` rents."""

    id: int
    machine_id: int
    host_id: int
    gpu: GpuModel
    num_gpus: int
    dph_base: float
    min_bid: float
    storage_cost: float
    disk_space: float
    cpu_cores: int
    cpu_ram: int
    inet_up: float
    inet_down: float
    direct_port_count: int
    reliability: float
    verified: bool
    external: bool
    rentable: bool
    geolocation: str
    cuda_max_good: float
    driver_version: str
    static_ip: bool
    # the instance (ours) currently holding the GPU, if any; `rented_elsewhere` = another client has it
    holder: int | None = None
    rented_elsewhere: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.rentable and self.holder is None and not self.rented_elsewhere

    def storage_dph(self, disk_gb: float) -> float:
        return disk_gb * self.storage_cost / HOURS_PER_MONTH

    def as_json(self, *, offer_type: str = "on-demand", allocated_storage: float = 5.0) -> dict[str, Any]:
        gpu_price = self.min_bid if offer_type == "bid" else self.dph_base
        storage = self.storage_dph(allocated_storage)
        dph_total = round(gpu_price + storage, 6)
        dlperf = round(self.gpu.dlperf * self.num_gpus * (0.9 + 0.1 * self.reliability), 3)
        total_flops = round(self.gpu.tflops * self.num_gpus, 2)
        score = round(dlperf / max(dph_total, 0.01) * self.reliability, 3)
        return {
            "id": self.id,
            "ask_contract_id": self.id,
            "bundle_id": self.id,
            "machine_id": self.machine_id,
            "host_id": self.host_id,
            "num_gpus": self.num_gpus,
            "gpu_name": self.gpu.name,
            "gpu_ram": self.gpu.vram_mb,
            "gpu_total_ram": self.gpu.vram_mb * self.num_gpus,
            "gpu_frac": 1.0,
            "gpu_arch": "nvidia",
            "gpu_mem_bw": self.gpu.mem_bw,
            "gpu_display_active": False,
            "gpu_max_power": 450.0,
            "gpu_max_temp": 83.0,
            "compute_cap": self.gpu.compute_cap,
            "total_flops": total_flops,
            "dlperf": dlperf,
            "dlperf_per_dphtotal": round(dlperf / max(dph_total, 0.01), 3),
            "flops_per_dphtotal": round(total_flops / max(dph_total, 0.01), 3),
            "score": score,
            "cpu_arch": "amd64",
            "cpu_name": "AMD EPYC 7B13",
            "cpu_cores": self.cpu_cores,
            "cpu_cores_effective": float(self.cpu_cores),
            "cpu_ghz": 3.0,
            "cpu_ram": self.cpu_ram,
            "has_avx": 1,
            "disk_space": self.disk_space,
            "disk_bw": 2000.0,
            "disk_name": "Samsung SSD 990 PRO",
            "pci_gen": 4.0,
            "pcie_bw": 24.5,
            "bw_nvlink": 0.0,
            "mobo_name": "ROMED8-2T",
            "inet_up": self.inet_up,
            "inet_down": self.inet_down,
            "inet_up_cost": 0.0,
            "inet_down_cost": 0.0,
            "direct_port_count": self.direct_port_count,
            "public_ipaddr": "127.0.0.1",
            "static_ip": self.static_ip,
            "dph_base": self.dph_base,
            "dph_total": dph_total,
            "discounted_dph_total": round(dph_total * 0.75, 6) if offer_type == "reserved" else dph_total,
            "min_bid": self.min_bid,
            "is_bid": offer_type == "bid",
            "storage_cost": self.storage_cost,
            "storage_total_cost": round(storage, 6),
            "reliability": self.reliability,
            "reliability2": self.reliability,
            "rentable": self.available,
            "rented": self.holder is not None or self.rented_elsewhere,
            "verified": self.verified,
            "verification": "verified" if self.verified else "unverified",
            "external": self.external,
            "datacenter": not self.external and self.verified,
            "hosting_type": 1 if self.verified else 0,
            "geolocation": self.geolocation,
            "cuda_max_good": self.cuda_max_good,
            "driver_version": self.driver_version,
            "ubuntu_version": "22.04",
            "vms_enabled": False,
            "duration": 30 * 86400.0,
            "start_date": None,
            "end_date": None,
            "time_remaining": "",
            "webpage": None,
            "logo": "/static/logos/vastai_small2.png",
        }


def build_catalogue(seed: int, size: int = 320) -> list[Offer]:
    """A reproducible marketplace. Every GPU model gets one clean offer (verified, rentable, ports,
    reliable) so tests can always find one; the rest are drawn at random, warts included."""
    rng = random.Random(seed)
    offers: list[Offer] = []
    next_id = 6_100_000 + rng.randrange(0, 100_000)
    next_machine = 21_000 + rng.randrange(0, 5_000)

    def draw(gpu: GpuModel, clean: bool) -> Offer:
        nonlocal next_id, next_machine
        next_id += rng.randrange(7, 400)
        next_machine += rng.randrange(1, 9)
        num_gpus = 1 if clean else rng.choice((1, 1, 1, 2, 2, 4, 4, 8))
        price = gpu.dph_per_gpu * num_gpus * rng.uniform(0.7, 1.45)
        if clean:
            ports, reliability, verified, external, rentable = rng.randrange(16, 400), 0.995, True, False, True
        else:
            ports = 0 if rng.random() < 0.12 else rng.choice((1, 2, 3, 8, 24, 64, 200, 1000))
            reliability = round(rng.choice((rng.uniform(0.6, 0.9), rng.uniform(0.9, 0.9999))), 4)
            verified = rng.random() < 0.78
            external = rng.random() < 0.1
            rentable = rng.random() < 0.9
        offer = Offer(
            id=next_id,
            machine_id=next_machine,
            host_id=100_000 + next_machine % 9_000,
            gpu=gpu,
            num_gpus=num_gpus,
            dph_base=round(price, 4),
            min_bid=round(price * rng.uniform(0.35, 0.6), 4),
            storage_cost=round(rng.uniform(0.05, 0.3), 3),
            disk_space=float(rng.choice((64, 128, 256, 512, 1024, 2048))),
            cpu_cores=num_gpus * rng.choice((8, 12, 16, 32)),
            cpu_ram=num_gpus * rng.choice((32, 64, 128, 256)) * 1024,
            inet_up=round(rng.uniform(80, 9000), 1),
            inet_down=round(rng.uniform(200, 9000), 1),
            direct_port_count=ports,
            reliability=reliability,
            verified=verified,
            external=external,
            rentable=rentable,
            geolocation=rng.choice(_PLACES),
            cuda_max_good=rng.choice((11.8, 12.2, 12.4, 12.6, 12.8, 12.9)) if not clean else 12.8,
            driver_version=rng.choice(("535.183.01", "550.120", "560.35.03", "570.133.07")),
            static_ip=rng.random() < 0.5,
        )
        if not clean and rentable and rng.random() < 0.08:
            # Already rented by someone else: listed, not available.
            offer.rented_elsewhere = True
            offer.rentable = False
        return offer

    for gpu in GPU_MODELS:
        offers.append(draw(gpu, clean=True))
    weights = [3 if g.name in {"RTX 4090", "RTX 3090", "H100 SXM", "A100 SXM4"} else 1 for g in GPU_MODELS]
    while len(offers) < size:
        offers.append(draw(rng.choices(GPU_MODELS, weights=weights)[0], clean=False))
    return offers
