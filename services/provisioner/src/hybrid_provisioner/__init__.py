"""hybrid_provisioner."""
