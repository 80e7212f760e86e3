"""hybrid_proxy."""
