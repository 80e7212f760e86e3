"""hybrid_scheduler."""
