"""sentinel-lightning: prune the attention heads of Hugging Face causal LMs while fine-tuning them with Lightning."""

from sentinel_lightning.callbacks import (
    DivergenceError,
    DivergenceGuard,
    GateMonitor,
    HeadMetrics,
    HeadPruning,
    HeadReactivation,
    KeyValueMerging,
)
from sentinel_lightning.compaction import compact
from sentinel_lightning.data import LanguageModelingDataModule
from sentinel_lightning.events import HeadEvent, HeadEventListener, ModuleHeadEventListener, PruningAwareModule
from sentinel_lightning.gates import HeadGates, attach_gates, find_gates
from sentinel_lightning.module import GatedLanguageModel
from sentinel_lightning.saving import load_pruned, save_pruned
from sentinel_lightning.strategies import STRATEGIES, select_heads

__all__ = [
    "STRATEGIES",
    "DivergenceError",
    "DivergenceGuard",
    "GateMonitor",
    "GatedLanguageModel",
    "HeadEvent",
    "HeadEventListener",
    "HeadGates",
    "HeadMetrics",
    "HeadPruning",
    "HeadReactivation",
    "KeyValueMerging",
    "LanguageModelingDataModule",
    "ModuleHeadEventListener",
    "PruningAwareModule",
    "attach_gates",
    "compact",
    "find_gates",
    "load_pruned",
    "save_pruned",
    "select_heads",
]
