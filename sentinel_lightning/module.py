"""``GatedLanguageModel``: fine-tunes a gated Hugging Face causal LM with the causal-LM loss."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, get_linear_schedule_with_warmup
from typing_extensions import override

from sentinel_lightning.gates import HeadGates, attach_gates
from sentinel_lightning.metrics import Perplexity, causal_lm_nll
from sentinel_lightning.pretrained import load_causal_lm


class GatedLanguageModel(L.LightningModule):
    """A causal LM whose every attention head is gated, trained with AdamW and a linear warm-up and decay.

    Args:
        model: Hub name or local path (loaded with ``AutoModelForCausalLM``), an already built
            ``PreTrainedModel``, or None for the embedded default (SmolLM2-135M-Instruct).
        gguf_file: GGUF file inside ``model``'s folder, when the weights come from one.
        model_config: A config dict to build a randomly initialised model from (used when a checkpoint of a
            module built around a ``PreTrainedModel`` object is loaded again); ignored when ``model`` is given.
        learning_rate: Peak learning rate of the model's weights.
        gate_learning_rate: Peak learning rate of the gates.
        learn_gates: Whether the gates are trained (their gradients are computed either way for head metrics).
        weight_decay: AdamW weight decay of the matrices (not of biases, norms or gates).
        warmup_ratio: Share of the training steps spent warming the learning rate up linearly from 0.
        attn_implementation: Attention implementation to load the model with (``"sdpa"``, ``"eager"``, ...).
    """

    def __init__(
        self,
        model: str | PreTrainedModel | None = None,
        gguf_file: str | None = None,
        model_config: dict[str, Any] | None = None,
        learning_rate: float = 5e-5,
        gate_learning_rate: float = 1e-2,
        learn_gates: bool = True,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        attn_implementation: str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("learning_rate", learning_rate), ("gate_learning_rate", gate_learning_rate)):
            if not value > 0:
                raise ValueError(f"{name}={value} must be positive.")
        if weight_decay < 0:
            raise ValueError(f"weight_decay={weight_decay} must be non-negative.")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio={warmup_ratio} must lie in [0, 1).")
        load_kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        if isinstance(model, PreTrainedModel):
            self.model = model
            model_config = model.config.to_dict()
            model = None
        elif model is None and model_config is not None:
            config = AutoConfig.for_model(**model_config)
            self.model = AutoModelForCausalLM.from_config(config, **load_kwargs)
        else:
            self.model = load_causal_lm(model, gguf_file, **load_kwargs)
        self.model.train()  # from_pretrained returns eval mode; a module starts in train mode like any nn.Module
        self.save_hyperparameters(ignore=["model", "model_config"])
        # A checkpoint rebuilds the module from a name or path, or else from the config of the model object.
        self.hparams.update(model=model, model_config=model_config if model is None else None)
        self.gates: HeadGates = attach_gates(self.model)
        self.gates.values.requires_grad_(learn_gates)
        self.val_perplexity = Perplexity()

    @override
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Returns the logits ``[batch, seq, vocab]`` of ``input_ids`` ``[batch, seq]``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        nll_sum, tokens = causal_lm_nll(self.model, batch)
        loss = nll_sum / tokens.clamp_min(1)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.val_perplexity.update(*causal_lm_nll(self.model, batch))

    @override
    def on_validation_epoch_end(self) -> None:
        perplexity = self.val_perplexity.compute()  # token-weighted over every rank's batches
        self.val_perplexity.reset()
        self.log("val_ppl", perplexity, prog_bar=True)
        self.log("val_loss", perplexity.log())

    @override
    def configure_optimizers(self):
        decay, no_decay = [], []
        for parameter in self.model.parameters():
            if not parameter.requires_grad or parameter is self.gates.values:
                continue
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if self.hparams.learn_gates:
            groups.append({"params": [self.gates.values], "lr": self.hparams.gate_learning_rate, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.learning_rate)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = get_linear_schedule_with_warmup(
            optimizer, math.ceil(self.hparams.warmup_ratio * total_steps), total_steps
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
