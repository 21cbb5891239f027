"""The node: the task tree (`node`), its connections, housekeeping, divergence watch, lag,
status and the apply path, each in its own module, sharing small typed objects."""

from replicator.node.node import Node
from replicator.node.options import NodeOptions
from replicator.node.startup import unbuilt_settings

__all__ = ["Node", "NodeOptions", "unbuilt_settings"]
