"""hybrid_scheduler: the chain clock, PoC windows, rentals timed by measured boots, confirmation PoC.

Parts: ``chain`` (reading the endpoints), ``observer`` (polling, fallbacks, the last good view), ``blockclock``
(measured block time), ``window`` (PoC windows from live parameters), ``boots`` (measured boot history),
``policy`` (the rental policy, also run by ``bench/schedule.py``), ``planner`` (the leader's tick), ``book``
(campaign records in Redis), ``facts`` (the provisioner's events), ``confirmation`` (confirmation PoC),
``worker`` (the service: lease, loops, commands), ``settings``, ``telemetry``.
"""
