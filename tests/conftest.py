"""Tiny randomly initialised models of every supported family: 2 layers, 4 heads, width 32.

The families come from the registry (``sentinel_lightning.standalone.families.FAMILIES``): a new entry there is
tested by every test that takes the ``family`` fixture, and by those parametrised over ``HEAD_COMPACTING`` (the
families whose ``compact`` removes single heads) or ``GROUPED`` (grouped-query attention) where they apply.
"""

import pytest
import torch

from sentinel_lightning.cli.fit import JOB_DEFAULTS
from sentinel_lightning.module import GatedLanguageModel
from sentinel_lightning.standalone import families
from sentinel_lightning.tiny import TINY_VOCAB, tiny_config, tiny_model  # noqa: F401 (used by the tests)

VOCAB = TINY_VOCAB


def byte_tokenizer():
    """The package's offline byte-level tokenizer (vocab 257), matching the tiny models."""
    from sentinel_lightning.pretrained import byte_level_tokenizer

    return byte_level_tokenizer()


FAMILIES = sorted(families.FAMILIES)
HEAD_COMPACTING = [name for name in FAMILIES if families.FAMILIES[name].compacts_heads]
GROUPED = [name for name in FAMILIES if families.FAMILIES[name].grouped_query]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def tokens():
    torch.manual_seed(1)
    return torch.randint(3, VOCAB, (2, 12))


def tiny_data(block_size: int = 32, batch_size: int = 4):
    """The embedded corpus with the byte-level tokenizer, in short blocks."""
    from sentinel_lightning.data import LanguageModelingDataModule

    return LanguageModelingDataModule(
        tokenizer=byte_tokenizer(), block_size=block_size, batch_size=batch_size, cache=False
    )


def tiny_trainer(**kwargs):
    """A quiet CPU Trainer for a few tiny batches; keyword arguments override the defaults."""
    import lightning as L

    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})



class ScriptedPerplexity(GatedLanguageModel):
    """Logs a scripted ``fake_ppl`` after each validation (the last value repeats), to force or avoid a regression."""

    def __init__(self, script, **kwargs):
        super().__init__(**kwargs)
        self.script = list(script)

    def on_validation_epoch_end(self):
        super().on_validation_epoch_end()
        self.log("fake_ppl", float(self.script[min(self.trainer.current_epoch, len(self.script) - 1)]))


def assert_job_defaults(printed: dict) -> None:
    """Every ``JOB_DEFAULTS`` setting appears in a printed job config (``--print_config``, parsed)."""
    for dotted, value in JOB_DEFAULTS.items():
        group, name = dotted.split(".")
        printed_value = printed[group][name]
        if name == "schedule":  # YAML keys of the printed schedule may be strings
            printed_value = {int(key): target for key, target in printed_value.items()}
        assert printed_value == value, dotted
