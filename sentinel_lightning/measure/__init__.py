"""Measuring every head inside the model's own passes: attention entropy (``attention_entropy``), head outputs and
per-example gate gradients (``head_outputs``), and the estimators built on them with the Trainer-free
``measure_head_metrics`` (``statistics``)."""

from sentinel_lightning.measure.attention_entropy import EntropyRecording, attention_entropy
from sentinel_lightning.measure.head_outputs import ExampleImportance, HeadOutputRecording
from sentinel_lightning.measure.statistics import HeadStatistics, measure_head_metrics

__all__ = [
    "EntropyRecording",
    "ExampleImportance",
    "HeadOutputRecording",
    "HeadStatistics",
    "attention_entropy",
    "measure_head_metrics",
]
