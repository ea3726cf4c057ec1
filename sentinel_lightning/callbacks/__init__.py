"""Lightning callbacks that watch, prune and reactivate attention heads, and show the gates."""

from sentinel_lightning.callbacks.divergence import DivergenceError, DivergenceGuard
from sentinel_lightning.callbacks.gate_monitor import GateMonitor
from sentinel_lightning.callbacks.head_metrics import HeadMetrics
from sentinel_lightning.callbacks.merging import KeyValueMerging
from sentinel_lightning.callbacks.pruning import HeadPruning
from sentinel_lightning.callbacks.reactivation import HeadReactivation

__all__ = ["DivergenceError", "DivergenceGuard", "GateMonitor", "HeadMetrics", "HeadPruning", "HeadReactivation",
           "KeyValueMerging"]
