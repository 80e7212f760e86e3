"""Issue #6: the provisioner's Vast.ai client against the simulator, quirk by quirk (vastai-api.md)."""

from __future__ import annotations

import asyncio

import pytest

from hybrid_common import TEST
from hybrid_common.messages.domain import OfferFilter
from hybrid_provisioner.offers import find_offers
from hybrid_provisioner.profiles import OfferPolicy, load_profiles
from hybrid_provisioner.settings import ProvisionerSettings
from hybrid_provisioner.vast import (
    OfferUnavailable,
    VastAuthError,
    VastClient,
    VastError,
    VastQuotaExceeded,
)
from hybrid_provisioner.vast.instance import address
from sim.vast import start_vast

IMAGE = "vastai/base-image:cuda-12.4"


async def test_list_pages_gone_instances_errors_and_retries() -> None:
    vast = await start_vast(port=0, profile=TEST, boot_scale=0.05, rate_limits=False)
    client = VastClient(vast.url, "test", backoff=0.01, backoff_cap=0.05)
    try:
        offers = await client.search_offers({"rentable": {"eq": True}, "order": [["dph_total", "asc"]], "limit": 200})
        ids: list[int] = []
        rented: list[int] = []
        for offer in offers:
            if len(ids) == 30:
                break
            try:
                made = await client.create_instance(
                    int(offer["id"]), {"image": IMAGE, "disk": 10, "label": f"pg-{len(ids)}", "env": {"-p 80:80": "1"}}
                )
            except VastError:
                continue
            assert made.accepted
            ids.append(made.instance_id)
            rented.append(int(offer["id"]))
        assert len(ids) == 30
        # v1 list, 25 per page: every instance comes back across the pages.
        listed = await client.list_instances()
        assert sorted(int(i["id"]) for i in listed) == sorted(ids)
        only = await client.list_instances({"label": {"eq": "pg-3"}})
        assert [i["id"] for i in only] == [ids[3]]

        # Running instances: public_ipaddr carries whitespace, HostPort is a string.
        inst = await client.show_instance(ids[0])
        assert inst is not None
        for _ in range(200):
            inst = await client.show_instance(ids[0])
            if inst and inst.get("actual_status") == "running":
                break
            await asyncio.sleep(0.05)
        assert inst is not None and inst["actual_status"] == "running"
        addr = address(inst)
        assert addr.public_ip == "127.0.0.1" and 80 in addr.ports and isinstance(addr.ports[80], int)

        # Gone: destroy → {"instances": null} → None; a second destroy answers 404 → False.
        assert await client.destroy_instance(ids[0]) is True
        assert await client.show_instance(ids[0]) is None
        assert await client.destroy_instance(ids[0]) is False
        logs = await client.request_logs(ids[1], tail=50, poll_every=0.02)
        assert "placed on machine" in logs

        # Errors carry the API's error and msg; an offer that vanished is its own error.
        with pytest.raises(OfferUnavailable) as gone:
            await client.create_instance(rented[5], {"image": IMAGE, "disk": 10})
        assert gone.value.error in {"no_such_ask", "invalid_args"} and "no_such_ask" in (gone.value.msg or "")
        with pytest.raises(VastError) as bad:
            await client.create_instance(int(offers[-1]["id"]), {"image": IMAGE, "disk": 2})
        assert bad.value.status == 400 and bad.value.error == "invalid_args" and "8 GB" in (bad.value.msg or "")
        wrong = VastClient(vast.url, "not-the-key")
        with pytest.raises(VastAuthError):
            await wrong.list_instances()
        await wrong.close()

        # 5xx bursts (an HTML 502 page too) and plain-text 429s are retried on reads; the quota 429 is not.
        vast.inject(kind="http_error", route="list", status=502, count=2)
        vast.inject(kind="http_error", route="list", status=429, body="text", count=2)
        before = client.retried
        assert len(await client.list_instances()) == 29
        assert client.retried - before == 4
        vast.inject(kind="search_quota")
        with pytest.raises(VastQuotaExceeded):
            await client.search_offers({})
        credit = await client.credit()
        assert credit is not None and 0 < credit < 1000
    finally:
        await client.close()
        await vast.close()


async def test_offer_policy_filters_and_sorts_cheapest_adequate_first() -> None:
    vast = await start_vast(port=0, profile=TEST, rate_limits=False)
    client = VastClient(vast.url, "test")
    try:
        profile = load_profiles(ProvisionerSettings(_env_file=None))["mlnode-v1"]
        offers = await find_offers(client, profile, profile.policy)
        assert offers, "the simulated market has fitting GPUs"
        prices = [o.dph_total for o in offers]
        assert prices == sorted(prices)
        for o in offers:
            assert o.num_gpus == 1 and o.gpu_ram_mb >= 40_000 * 0.97 and o.direct_port_count >= 2
            assert o.dph_total <= profile.policy.max_dph and o.reliability >= 0.9 and o.disk_space >= 100
            assert o.raw["verified"] and not o.raw["external"] and o.raw["rentable"] and (o.cuda or 0) >= 12.0
        excluded = profile.policy.narrowed(None, [offers[0].machine_id])
        assert offers[0].machine_id not in {o.machine_id for o in await find_offers(client, profile, excluded)}
        fast = profile.policy.narrowed(OfferFilter(min_inet_down_mbps=2000), [])
        fast_offers = await find_offers(client, profile, fast)
        assert fast_offers and all(o.inet_down >= 2000 for o in fast_offers)
        assert len(fast_offers) < len(offers), "the bandwidth floor from a command narrows the search"
        picky = profile.policy.model_copy(update={"gpu_names": ["H100 SXM"], "max_dph": 100.0})
        assert {o.gpu_name for o in await find_offers(client, profile, picky)} == {"H100 SXM"}
        none = OfferPolicy(min_vram_gb=10_000)
        assert await find_offers(client, profile, none) == []
    finally:
        await client.close()
        await vast.close()
