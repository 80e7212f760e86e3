"""The scheduler's Prometheus metrics (``hybrid_scheduler_*``), served on ``port("scheduler.metrics")``."""

from __future__ import annotations

from hybrid_common.metrics import SLOW_BUCKETS, counter, gauge, histogram

CHAIN_HEIGHT = gauge("scheduler_chain_height", "last observed block height")
BLOCK_SECONDS = gauge("scheduler_block_seconds", "measured block time (Theil–Sen over recent heights)")
STALE_SECONDS = gauge("scheduler_chain_stale_seconds", "age of the last good chain view")
CHAIN_FAILURES = counter("scheduler_chain_failures", "failed or refused chain answers", ("endpoint",))
LEADER = gauge("scheduler_leader", "1 while this replica holds the scheduler lease")
PAUSED = gauge("scheduler_paused", "1 while scheduling is paused")
LEAD_SECONDS = gauge("scheduler_lead_seconds", "seconds before poc_start the first GPU of the next window starts")
WINDOWS = counter("scheduler_windows", "PoC windows by outcome", ("outcome",))
DECISIONS = counter("scheduler_decisions", "rental policy actions taken", ("action",))
COMMANDS = counter("scheduler_commands", "commands published to the provisioner", ("command",))
BOOTS = histogram("scheduler_boot_seconds", "command to registered node, per kind", ("kind",), buckets=SLOW_BUCKETS)
CONFIRMATIONS = counter("scheduler_confirmation_pocs", "confirmation PoC events seen, by policy action", ("action",))
EPOCH_WEIGHT = gauge("scheduler_epoch_weight", "the participant's weight in the last epoch whose weights were read")
