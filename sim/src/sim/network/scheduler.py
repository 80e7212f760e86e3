"""The one loop that turns clock heights into chain blocks, in order, never skipping one.

Per block: a new epoch begins when the height reaches the next PoC start; the dapi's node list reaches
the chain on its sync tick (every ``node_sync_seconds``, 60 s real, scaled); in the block where PoC
validation ends the weights are fixed from the chain's node list *at that block* (a sync landing in the
same block counts); confirmation PoC events advance; then the driver reconciles nodes whose desired
state moved. Under CPU load the loop falls behind and catches up height by height.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

from hybrid_common import TimeProfile
from sim.network.chain import Chain, EpochRecord
from sim.network.clock import BlockClock
from sim.network.confirmation import ConfirmationPoC
from sim.network.driver import NodeDriver
from sim.network.nodes import NodeRegistry
from sim.network.params import NetworkParams

log = logging.getLogger(__name__)
KEEP_EPOCHS = 64


class BlockScheduler:
    def __init__(
        self,
        *,
        clock: BlockClock,
        chain: Chain,
        registry: NodeRegistry,
        params: NetworkParams,
        profile: TimeProfile,
        driver: NodeDriver,
        confirmation: ConfirmationPoC,
    ) -> None:
        self.clock = clock
        self.chain = chain
        self.registry = registry
        self.params = params
        self.profile = profile
        self.driver = driver
        self.confirmation = confirmation
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="chain-blocks")

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            target = self.clock.height()
            done = 0
            while self.chain.height < target:
                try:
                    self.process(self.chain.height + 1)
                except Exception:
                    log.exception("processing block %d failed", self.chain.height + 1)
                    self.chain.height += 1
                done += 1
                if done % 200 == 0:
                    await asyncio.sleep(0)
            wait = self.clock.seconds_until(self.chain.height + 1)
            wait = 0.25 if math.isinf(wait) else min(max(wait, 0.002), 0.25)
            self._wake.clear()
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait)

    # --- one block -------------------------------------------------------------------------

    def process(self, height: int) -> None:
        chain = self.chain
        chain.height = height
        wall = time.time() - (time.monotonic() - self.clock.time_of(height))
        chain.last_block_time = max(chain.last_block_time, wall)
        ctx = chain.context()
        if height >= ctx.next_poc_start():
            self._new_epoch(height)
        if self.is_sync_height(height):
            self._sync(height)
        ctx = chain.context()
        if ctx.index > 0 and height == ctx.validation_end():
            self._fix_weights(height)
        self.confirmation.on_block(height, ctx)
        self.driver.on_block()

    def _new_epoch(self, height: int) -> None:
        chain = self.chain
        record = EpochRecord(
            index=chain.latest.index + 1,
            poc_start=height,
            poc_generation=chain.generation(),
            started_at_height=height,
        )
        for node in self.registry.nodes.values():
            record.node(node)
        chain.epochs.append(record)
        if len(chain.epochs) > KEEP_EPOCHS:
            del chain.epochs[: len(chain.epochs) - KEEP_EPOCHS]
        log.info("epoch %d: PoC starts at %d (%s)", record.index, height, record.poc_generation)

    def sync_interval_blocks(self) -> float:
        return self.profile.scale(self.params.node_sync_seconds) / self.params.block_seconds

    def is_sync_height(self, height: int) -> bool:
        interval = self.sync_interval_blocks()
        if interval <= 1:
            return True
        return math.floor(height / interval) != math.floor((height - 1) / interval)

    def _sync(self, height: int) -> None:
        """The dapi's 60 s tick: its admin list, as it stood before this block, reaches the chain."""
        chain = self.chain
        changes = self.registry.changes
        while chain.applied_changes < len(changes) and changes[chain.applied_changes].height < height:
            change = changes[chain.applied_changes]
            if change.op == "remove":
                if chain.hardware_nodes.get(change.node_id) == change.node_num:
                    del chain.hardware_nodes[change.node_id]
            else:
                chain.hardware_nodes[change.node_id] = change.node_num
            chain.applied_changes += 1
        chain.last_sync_height = height

    def _fix_weights(self, height: int) -> None:
        record = self.chain.latest
        on_chain = dict(self.chain.hardware_nodes)
        stored = record.nonces.get(record.poc_start, {})
        total = 0
        for node_id, rec in record.nodes.items():
            nonces = len(stored.get(node_id, ()))
            if node_id in on_chain and on_chain[node_id] == rec.node_num:
                rec.weight = nonces
                rec.weight_note = "" if nonces else "no accepted nonces"
            else:
                rec.weight = 0
                rec.weight_note = (
                    f"not in the chain's node list at the end of PoC validation (height {height})"
                    if nonces
                    else "no accepted nonces; not on chain"
                )
            total += rec.weight
        record.total_weight = total
        record.weights_fixed_at = height
        record.chain_nodes_at_weights = sorted(on_chain)
        for node in self.registry.nodes.values():
            current = record.nodes.get(node.config.id)
            if current is not None and current.node_num == node.node_num:
                node.status.epoch_ml_nodes = {
                    node.config.model: {
                        "node_id": node.config.id,
                        "poc_weight": current.weight or 0,
                        "timeslot_allocation": [True, False],
                    }
                }
        log.info("epoch %d: weights fixed at %d, total %d", record.index, height, total)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
