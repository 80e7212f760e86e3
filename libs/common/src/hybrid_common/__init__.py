"""Contracts shared by the gonka-hybrid services: messages, topology, settings, Redis keys, time, ports."""

from hybrid_common._ports import PORTS, PortEntry, port
from hybrid_common._time import DEMO, PROFILES, REAL, TEST, EpochShape, TimeProfile, current_profile

__all__ = [
    "DEMO",
    "PORTS",
    "PROFILES",
    "REAL",
    "TEST",
    "EpochShape",
    "PortEntry",
    "TimeProfile",
    "current_profile",
    "port",
]
