"""hybridctl."""
