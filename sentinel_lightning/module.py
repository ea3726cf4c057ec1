"""``GatedLanguageModel``: fine-tunes a gated Hugging Face causal LM with the causal-LM loss (and distillation)."""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning as L
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, get_linear_schedule_with_warmup
from typing_extensions import override

from sentinel_lightning.events import HeadEvent
from sentinel_lightning.gates import HeadGates, attach_gates, detach_gates, find_causal_lm, find_gates
from sentinel_lightning.lora import add_lora
from sentinel_lightning.losses import causal_lm_inputs, causal_lm_nll, causal_lm_token_kl, causal_lm_token_losses
from sentinel_lightning.metrics import Perplexity
from sentinel_lightning.pretrained import load_causal_lm
from sentinel_lightning.sharding import clip_gradients, shard_gated_model

TEACHERS = ("loaded", "before_pruning")


class _Teacher:
    """Holds the distillation teacher where ``nn.Module`` does not look (a plain attribute, not a submodule): in
    no ``state_dict()``, no ``parameters()`` (so no optimizer) and no ``.to()``.

    Attributes:
        model: The frozen teacher (eval mode, no gradients), or None.
        taken_at_step: The global step of the pruning event ``on_before_prune`` took it at, or None.
    """

    def __init__(self) -> None:
        self.model: PreTrainedModel | None = None
        self.taken_at_step: int | None = None

    def set(self, model: PreTrainedModel | None, taken_at_step: int | None = None) -> None:
        """Makes ``model`` the teacher (frozen here), or none with None (to free the previous one before a copy)."""
        self.model = None if model is None else model.eval().requires_grad_(False)
        self.taken_at_step = taken_at_step


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
        distillation: Weight ``d`` in [0, 1] of the distillation from the dense model: the training loss is
            ``(1 - d) * CE + d * T**2 * KL(teacher_T || student_T)``, both averaged over the predicted tokens (one
            forward, one mask: ``losses.causal_lm_inputs``). 0 (the default) is plain fine-tuning, with no teacher.
        distillation_temperature: Temperature ``T`` > 0 of both distributions in the KL.
        distillation_teacher: ``"loaded"``: the model as loaded (dense, before any pruning or fine-tuning);
            ``"before_pruning"``: the model as it was just before the latest pruning event (fine-tuned so far,
            with the heads that event pruned), taken afresh at every pruning event; until the first one the loss
            is the plain causal-LM loss.
        lora: None (the default: every weight is fine-tuned), or a LoRA configuration: a dict of
            ``peft.LoraConfig`` arguments (``{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj",
            "o_proj"]}``; on the command line ``--model.lora '{r: 8, target_modules: [q_proj, v_proj]}'``) or a
            ``LoraConfig``. The model is wrapped with ``peft.get_peft_model`` (``self.model`` is then a
            ``PeftModel``): its base weights are frozen and only the adapters and the gates are trained; the gates
            sit on the output projections as peft wrapped them (``lora.add_lora``), and ``compact`` merges the
            adapters before it cuts (``lora.merge_adapters``). Needs ``pip install "sentinel-lightning[lora]"``.

    Distillation: the teacher is a frozen copy of the model, in eval mode, with no gradients. ``"loaded"`` copies
    it as loaded (taken before the gates are attached, or with them detached). ``"before_pruning"`` copies the
    gated model just before ``HeadPruning`` changes any gate or compensation (``on_before_prune``; for another
    callback's event, when it is announced, with the event's heads given back), so the student learns to write
    what the fine-tuned model wrote before it lost them. It is kept out
    of the module tree: it is in no optimizer, not in ``state_dict()``, and ``.to()`` does not see it; the training
    step moves it to the module's device. ``load_from_checkpoint`` rebuilds a ``"loaded"`` teacher from the same
    source (``model``: a name or path, or the embedded default); a ``"before_pruning"`` teacher, which no source
    can rebuild, travels in the checkpoint (``checkpoint["distillation_teacher"]``, one more copy of the weights),
    so that a resumed run distils from the same teacher. Under DDP every rank builds (or unpickles) its own. A
    module built from ``model_config`` (a checkpoint of a module built around a model object) has no dense weights
    to copy and refuses to fit with ``"loaded"`` distillation: pass the dense model again,
    ``GatedLanguageModel.load_from_checkpoint(path, model=<the model as loaded>)``. The step logs ``train_ce``
    and ``train_kl`` (at temperature ``T``, unscaled) besides ``train_loss``; ``val_ppl`` stays the plain
    causal-LM perplexity.

    What the teacher costs: memory, one more copy of the weights in their loaded dtype (fp32: N parameters x 4
    bytes) plus, per step, its logits and a few ``[tokens, vocab]`` fp32 tensors for the KL; time, one no-grad
    forward per training step and the KL (measured by ``scripts/measure_callback_overhead.py --distillation``,
    docs/overhead.md).
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
        distillation: float = 0.0,
        distillation_temperature: float = 2.0,
        distillation_teacher: str = "loaded",
        lora: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        _check_arguments(
            learning_rate, gate_learning_rate, weight_decay, warmup_ratio, distillation, distillation_temperature
        )
        if distillation_teacher not in TEACHERS:
            raise ValueError(f"distillation_teacher={distillation_teacher!r} is not one of {TEACHERS}.")
        load_kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        from_config = model is None and model_config is not None  # randomly initialised: no dense weights
        if isinstance(model, PreTrainedModel):
            self.model = model
            model_config = model.config.to_dict()
            model = None
        elif from_config:
            config = AutoConfig.for_model(**model_config)
            self.model = AutoModelForCausalLM.from_config(config, **load_kwargs)
        else:
            self.model = load_causal_lm(model, gguf_file, **load_kwargs)
        self.model.train()  # from_pretrained returns eval mode; a module starts in train mode like any nn.Module
        self.save_hyperparameters(ignore=["model", "model_config"])
        # A checkpoint rebuilds the module from a name or path, or else from the config of the model object.
        self.hparams.update(model=model, model_config=model_config if model is None else None)
        self._teacher = _Teacher()  # None without distillation
        self._teacher.set(self._copy_teacher(built_from_config=from_config))
        if lora is not None:  # after the teacher's copy, which stays the plain model
            self.model = add_lora(self.model, lora)
        self.gates: HeadGates = attach_gates(find_causal_lm(self.model))
        self.gates.values.requires_grad_(learn_gates)
        self.val_perplexity = Perplexity()
        self._sharded = False  # configure_model, under ModelParallelStrategy

    @override
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Returns the logits ``[batch, seq, vocab]`` of ``input_ids`` ``[batch, seq]``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    @property
    def teacher(self) -> PreTrainedModel | None:
        """The frozen dense teacher (eval mode, no gradients), or None when ``distillation`` is 0."""
        return self._teacher.model

    def _copy_teacher(self, built_from_config: bool) -> PreTrainedModel | None:
        """A frozen copy of ``self.model`` as loaded, without gates; None without distillation or dense weights, or
        when the teacher is taken at pruning events."""
        if self.hparams.distillation == 0 or built_from_config or self.hparams.distillation_teacher != "loaded":
            return None
        teacher = copy.deepcopy(self.model)
        detach_gates(teacher)  # a model object given with gates already attached: the teacher is its dense self
        return teacher

    def on_before_prune(self, trainer: L.Trainer, heads: list[tuple[int, int]]) -> None:
        """Called by ``HeadPruning`` just before it prunes ``heads`` (``events.PruningAwareModule``): with
        ``distillation_teacher="before_pruning"``, the model as it is now (gates and the compensation of earlier
        pruned heads included) becomes the teacher."""
        if self.hparams.distillation == 0 or self.hparams.distillation_teacher != "before_pruning":
            return
        self._teacher.set(None)  # free the previous teacher before copying
        self._teacher.set(copy.deepcopy(self.model), taken_at_step=trainer.global_step)

    def on_head_event(self, trainer: L.Trainer, event: HeadEvent) -> None:
        """A pruning event that ``on_before_prune`` did not see (another callback's) makes the model before it the
        teacher, as far as giving its heads back restores it (``events.ModuleHeadEventListener``)."""
        if event.kind != "prune" or self.hparams.distillation == 0:
            return
        if self.hparams.distillation_teacher != "before_pruning":
            return
        if self._teacher.taken_at_step == event.step:
            self._teacher.taken_at_step = None
            return
        self._teacher.set(None)  # free the previous teacher before copying
        teacher = copy.deepcopy(self.model)
        find_gates(teacher).reactivate(event.heads)
        self._teacher.set(teacher)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.hparams.distillation_teacher == "before_pruning" and self.teacher is not None:
            checkpoint["distillation_teacher"] = self.teacher.state_dict()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("distillation_teacher")
        if state is not None and self.hparams.distillation > 0:
            teacher = copy.deepcopy(self.model)  # the same architecture, gates included
            teacher.load_state_dict(state)
            self._teacher.set(teacher)

    @override
    def on_fit_start(self) -> None:
        if self.hparams.distillation > 0 and self.hparams.distillation_teacher == "loaded" and self.teacher is None:
            raise ValueError(
                f"distillation={self.hparams.distillation} needs the dense model as loaded, but this module was "
                "built from model_config (randomly initialised, as when a checkpoint of a module built around a "
                "model object is loaded): pass it again, GatedLanguageModel.load_from_checkpoint(path, "
                "model=<the model as loaded>), or set distillation=0."
            )

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        input_ids, attention_mask, labels = causal_lm_inputs(batch, next(self.model.parameters()).device)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        ce_sum, tokens = causal_lm_token_losses(logits, labels)
        loss = ce = ce_sum / tokens.clamp_min(1)
        batch_size = input_ids.shape[0]
        weight = self.hparams.distillation if self.teacher is not None else 0.0
        if weight > 0:
            kl = self._distillation_kl(input_ids, attention_mask, logits, labels) / tokens.clamp_min(1)
            loss = (1.0 - weight) * ce + weight * self.hparams.distillation_temperature**2 * kl
            self.log("train_kl", kl, batch_size=batch_size)
        self.log("train_ce", ce, batch_size=batch_size)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    def _distillation_kl(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        logits: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """Summed ``KL(teacher_T || student_T)`` over the predicted tokens of a batch.

        Args:
            input_ids: ``[batch, seq]``.
            attention_mask: ``[batch, seq]`` or None.
            logits: The student's logits ``[batch, seq, vocab]``.
            labels: The masked labels ``[batch, seq]`` (``causal_lm_inputs``).

        Returns:
            A scalar (fp32, differentiable through ``logits`` only).
        """
        teacher = self.teacher
        if teacher is None:
            raise RuntimeError(f"distillation={self.hparams.distillation} but the module has no teacher.")
        if next(teacher.parameters()).device != logits.device:
            teacher.to(logits.device)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return causal_lm_token_kl(logits, teacher_logits, labels, self.hparams.distillation_temperature)[0]

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
    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)``: FSDP2 shards the model,
        the gates stay whole on every rank (``sharding.shard_gated_model``). Nothing under any other strategy."""
        if self.device_mesh is not None and not self._sharded:
            shard_gated_model(self.model, self.device_mesh)
            self._sharded = True

    @override
    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        if self._sharded and gradient_clip_val:  # sharded and whole gradients together (sharding.clip_gradients)
            clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm or "norm")
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

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


def _check_arguments(
    learning_rate: float,
    gate_learning_rate: float,
    weight_decay: float,
    warmup_ratio: float,
    distillation: float,
    distillation_temperature: float,
) -> None:
    """Raises a ``ValueError`` naming the first argument of ``GatedLanguageModel`` out of its range."""
    for name, value in (("learning_rate", learning_rate), ("gate_learning_rate", gate_learning_rate)):
        if not value > 0:
            raise ValueError(f"{name}={value} must be positive.")
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay} must be non-negative.")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio={warmup_ratio} must lie in [0, 1).")
    if not 0.0 <= distillation <= 1.0:
        raise ValueError(
            f"distillation={distillation} must lie in [0, 1] (0: plain fine-tuning, 1: distillation only)."
        )
    if not (distillation_temperature > 0 and math.isfinite(distillation_temperature)):
        raise ValueError(f"distillation_temperature={distillation_temperature} must be positive and finite.")
