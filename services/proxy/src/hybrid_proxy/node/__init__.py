"""The inference-only ML node the dapi trusts (issue #9): OpenAI-compatible passthrough to a hosted upstream and
the MLNode control surface of a node without a GPU (gonka-protocol.md §1, §3, §4, §9, §10; inference-proxy.md)."""

from hybrid_proxy.node.app import InferenceNode

__all__ = ["InferenceNode"]
