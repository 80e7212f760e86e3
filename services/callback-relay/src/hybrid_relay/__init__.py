"""hybrid_relay."""
