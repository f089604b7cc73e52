"""The public ops of vlfast. Each runs on one of the backends of `vlfast.ops.backends`."""
from vlfast.ops.backends import AUTO, BACKENDS, BackendUnsupportedError, use_backend
from vlfast.ops.cross_attention import cross_attention
from vlfast.ops.memvp_memory import memvp_memory
from vlfast.ops.routed_adapter import routed_adapter

__all__ = ["AUTO", "BACKENDS", "BackendUnsupportedError", "cross_attention", "memvp_memory", "routed_adapter",
           "use_backend"]
