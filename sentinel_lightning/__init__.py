"""sentinel-lightning: prune the attention heads of Hugging Face causal LMs while fine-tuning them with Lightning."""

from sentinel_lightning.data import LanguageModelingDataModule
from sentinel_lightning.gates import HeadGates, attach_gates, find_gates
from sentinel_lightning.module import GatedLanguageModel

__all__ = ["GatedLanguageModel", "HeadGates", "LanguageModelingDataModule", "attach_gates", "find_gates"]
