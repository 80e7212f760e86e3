"""Issue #12: the weight earned per epoch, read the real way — the dapi's ``/v1/epochs/{epoch}/participants`` once the
epoch's ``set_new_validators`` has passed — and recorded in the epoch's PoC campaign (``scheduler:epochs``).

The scheduler's own pieces (``ChainClient``, ``EpochWeights``, ``EpochBook`` on the real Redis) against the dapi
simulator in this event loop, its clock paused and moved by jumps so the chain is exactly where the test says.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from redis.asyncio import Redis

from hybrid_common.messages.domain import Purpose
from hybrid_common.redis_keys import RedisKeys
from hybrid_scheduler.book import Campaign, CandidateRecord, EpochBook, FencedOut
from hybrid_scheduler.chain import ChainClient
from hybrid_scheduler.policy import CandidateKind
from hybrid_scheduler.settings import SIM_PARTICIPANT_ADDRESS
from hybrid_scheduler.weights import EpochWeights
from sim.network import DEFAULT_EPOCH_MODEL, start_dapi
from tests.integration.sim_network_helpers import (
    SHORT_P,
    SHORT_PROFILE,
    SHORT_SET_NEW_VALIDATORS,
    SHORT_SHAPE,
    DapiHTTP,
    silent_gpu,
)

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

PROFILE, SHAPE, P, SET_NEW_VALIDATORS = SHORT_PROFILE, SHORT_SHAPE, SHORT_P, SHORT_SET_NEW_VALIDATORS
SLOT = "poc-e1-1a"
NOBODY = "gonka1qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqt4v6ad"


async def only(book: EpochBook, key: str) -> dict[str, Campaign]:
    """One campaign as the tick hands campaigns over (each EpochWeights writes only what it is given)."""
    campaign = await book.get(key)
    assert campaign is not None
    return {key: campaign}


@pytest.fixture
async def book(redis_url: str, namespace: str) -> AsyncIterator[EpochBook]:
    redis = Redis.from_url(redis_url)
    keys = RedisKeys(namespace)
    try:
        yield EpochBook(redis, keys)
    finally:
        await redis.delete(keys.scheduler("epochs"), keys.scheduler("boots"))
        await redis.aclose()


async def test_the_weight_is_recorded_once_the_epochs_participants_are_on_chain(book: EpochBook) -> None:
    dapi = await start_dapi(profile=PROFILE, epoch=SHAPE, first_poc_start=P, inference_interval_seconds=0)
    client = ChainClient(dapi.public_url)
    try:
        async with aiohttp.ClientSession() as s:
            api = DapiHTTP(s, dapi.public_url, dapi.admin_url, dapi.callback_url)
            await api._json("POST", f"{api.public}/_sim/clock/pause")

            async def jump(height: int) -> None:
                status, body = await api._json("POST", f"{api.public}/_sim/clock/jump", {"height": height})
                assert status == 200, body
                await api.wait_height(height, timeout=20)

            # The PoC campaign of epoch 1 as the planner writes it, and the same epoch under an address the chain
            # does not list (another operator's scheduler reading the same network).
            view = await client.public_epoch()
            window = view.next_window()
            assert window.epoch_index == 1 and window.heights.set_new_validators == SET_NEW_VALIDATORS
            for key in ("poc-e1", "theirs-e1"):
                campaign = Campaign(key=key, purpose=Purpose.POC, epoch_index=1, window=window.heights, fence=1)
                campaign.candidates[SLOT] = CandidateRecord(slot_id=SLOT, slot=1, name="a", kind=CandidateKind.FRESH)
                assert await book.create(campaign)
            ours = EpochWeights(client, book, SIM_PARTICIPANT_ADDRESS, retry_seconds=0.01)
            theirs = EpochWeights(client, book, NOBODY, retry_seconds=0.01)

            # Our GPU, registered under its slot id before the PoC, delivers one batch of three nonces.
            await api.register(silent_gpu(SLOT, DEFAULT_EPOCH_MODEL))
            await jump(P + 1)
            node_num = (await api.nodes())[SLOT]["node"]["node_num"]
            batch = {"block_hash": "H", "block_height": P, "node_id": node_num, "nonces": [7, 8, 9], "dist": [0.1] * 3}
            assert await api.post_callback("/v1/poc-batches/generated", {"public_key": "k", **batch}) == (200, None)

            # The end of PoC validation fixed the weights, but the participants record comes at set_new_validators:
            # nothing is read or recorded before it.
            await jump(SET_NEW_VALIDATORS - 1)
            assert await client.participants(1) is None  # the dapi's 404
            view = await client.public_epoch()
            assert not ours.due((await only(book, "poc-e1"))["poc-e1"], view, view.observed_at)
            await ours.record(view, await only(book, "poc-e1"), 1, view.observed_at)
            assert (await only(book, "poc-e1"))["poc-e1"].weight is None

            await jump(SET_NEW_VALIDATORS)
            view = await client.public_epoch()
            await ours.record(view, await only(book, "poc-e1"), 1, view.observed_at)
            await theirs.record(view, await only(book, "theirs-e1"), 1, view.observed_at)
            # A deposed leader (an older fencing token) reads the same answer but cannot write the record.
            stale = (await only(book, "poc-e1"))["poc-e1"].model_copy(update={"weight": None})
            with pytest.raises(FencedOut):
                await EpochWeights(client, book, SIM_PARTICIPANT_ADDRESS, 0.01).record(
                    view, {"poc-e1": stale}, 0, view.observed_at
                )
            report = await api.report()
    finally:
        await client.close()
        await dapi.close()

    epoch = next(e for e in report["epochs"] if e["index"] == 1)
    recorded = await book.get("poc-e1")
    assert recorded is not None
    assert recorded.weight == epoch["total_weight"] == epoch["nodes"][SLOT]["weight"] == 3
    assert recorded.node_weights == {SLOT: 3} and recorded.weight_height == SET_NEW_VALIDATORS
    assert recorded.summary()["weight"] == 3 and "weight 3 for epoch 1 (our slots 3)" in recorded.notes[-1]
    other = await book.get("theirs-e1")
    assert other is not None and other.weight == 0 and other.node_weights == {}
    assert "is not among its active participants" in other.notes[-1]
