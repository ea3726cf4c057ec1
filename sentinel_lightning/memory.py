"""What the gates and the head callbacks keep in memory, from a model's config alone (no weights: the meta device).

``head_state_bytes`` names every per-head state of a fine-tune-with-pruning run and its bytes for a setting; the
states are the ones ``HeadGates``, ``HeadMetrics`` (``HeadStatistics``, ``HeadOutputRecording``,
``EntropyRecording``), ``HeadPruning`` and ``GatedLanguageModel``'s distillation teacher allocate.
``tests/test_memory.py`` checks them against what a tiny model's run actually holds; ``docs/scale.md`` tabulates
them for 135M to 70B configs.

Notation: ``L`` layers, ``H`` query heads, ``D`` head dim (``H * D`` the output projection's input), ``B`` batch,
``T`` sequence length, ``N`` the model's parameters.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from sentinel_lightning.standalone.families import head_shape

FP64, FP32 = 8, 4
PER_HEAD_MEAN_OVERHEAD = 5 * FP64  # weight, skipped and the three one-element defaults torchmetrics keeps
SMALL_STATISTICS = 6  # entropy, sink_mass, rest_entropy, grad_norm, example_importance, compensated_importance


def meta_model(config: PretrainedConfig, dtype: torch.dtype = torch.float32, lora: Any = None) -> torch.nn.Module:
    """The causal LM of ``config`` on the meta device (shapes and dtypes, no memory), LoRA-wrapped when asked."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if lora is not None:
            from sentinel_lightning.lora import add_lora

            model = add_lora(model, lora)
    return model


def head_state_bytes(
    config: PretrainedConfig,
    compensate: str = "linear",
    distillation_teacher: str | None = None,
    lora: Any = None,
    learn_gates: bool = True,
    batch_size: int = 4,
    sequence_length: int = 256,
    dtype: torch.dtype = torch.float32,
    activation_dtype: torch.dtype | None = None,
) -> dict[str, int]:
    """The bytes of every per-head state the gates and the head callbacks keep, for one setting.

    Args:
        config: The model's config (a supported family); only its shapes are used.
        compensate: ``HeadPruning(compensate=...)``: ``"none"``, ``"mean"`` or ``"linear"`` (the job's default).
        distillation_teacher: None (no distillation, the default), ``"loaded"`` or ``"before_pruning"``
            (``GatedLanguageModel(distillation_teacher=...)``).
        lora: None, or the LoRA configuration of ``GatedLanguageModel(lora=...)`` (changes what a
            ``"before_pruning"`` teacher copies).
        learn_gates: Whether the gates are trained (AdamW keeps two states per gate).
        batch_size, sequence_length: ``B`` and ``T`` of a training step.
        dtype: The dtype the weights are loaded in (the teacher's copy).
        activation_dtype: The dtype the model computes in (``bf16-mixed``: ``torch.bfloat16``); default ``dtype``.

    Returns:
        ``{state: bytes}``, on the training device unless said otherwise:

        - ``gates``: ``HeadGates``' values, masks, memories and fading ``[L, H]`` and ``compensation``
          ``[L, H, D]`` (fp32).
        - ``gate_gradient_and_optimizer``: the gates' gradient and, when learned, AdamW's two moments ``[L, H]``.
        - ``reconstruction``: ``HeadGates.reconstruction`` ``[L, H, D, H * D]`` fp32 (linear compensation, from the
          trainer's setup; in every checkpoint).
        - ``statistics``: ``HeadStatistics``' means ``[L, H]`` and ``output_mean`` ``[L, H, D]``, fp64 sums.
        - ``second_moment``: ``output_second_moment`` ``[L, H, D, H * D]``, an fp64 sum (linear compensation).
        - ``step_recording``: a training step's ``HeadOutputRecording`` sums (fp32: ``[L, H, D]`` sums, their
          prior, three ``[L, H]`` importances and, with linear compensation, ``[L, H * D, H * D]`` products).
        - ``step_head_outputs``: the heads' outputs ``[B, T, H, D]`` per layer the recording keeps from forward to
          backward, in ``activation_dtype``: views of the output projections' inputs, which autograd keeps anyway
          when that projection (or its adapter) trains.
        - ``entropy_step_attention``: an estimate, transient: the entropy step's eager attention materialises one
          layer's scores and probabilities ``[B, H, T, T]`` at a time (fp32, and the probabilities in
          ``activation_dtype`` for the product with the values), in forward and again when backward recomputes
          it; autograd keeps none of them (``attention_entropy``).
        - ``pruning_event``: transient, at a linear-compensation event: one layer's second moment reduced and
          averaged (``HeadMetrics.output_second_moment``: fp64 copy, fp64 mean, fp32 result), layer by layer.
        - ``teacher``: the distillation teacher: a copy of the plain weights (``"loaded"``), or of the gated
          (LoRA) model with its gates and reconstruction (``"before_pruning"``, also written into every
          checkpoint).
    """
    if compensate not in ("none", "mean", "linear"):
        raise ValueError(f"compensate={compensate!r} is not one of ('none', 'mean', 'linear').")
    if distillation_teacher not in (None, "loaded", "before_pruning"):
        raise ValueError(
            f"distillation_teacher={distillation_teacher!r} is not one of (None, 'loaded', 'before_pruning')."
        )
    activation_dtype = activation_dtype or dtype
    activation = torch.empty((), dtype=activation_dtype).element_size()
    model = meta_model(config, dtype)
    num_layers, num_heads, head_dim = head_shape(model)
    heads, width = num_layers * num_heads, num_heads * head_dim
    linear = compensate == "linear"
    products = num_layers * width * width  # L * (H * D)^2 = L * H * D * (H * D)

    # values, active, 2 memories, protected-until epoch, fading; compensation
    gates = heads * (FP32 + 1 + FP32 + FP32 + 8 + FP32) + heads * head_dim * FP32
    states = {
        "gates": gates,
        "gate_gradient_and_optimizer": heads * FP32 * (3 if learn_gates else 1),
        "reconstruction": products * FP32 if linear else 0,
        "statistics": SMALL_STATISTICS * (heads * FP64 + PER_HEAD_MEAN_OVERHEAD)
        + heads * head_dim * FP64 + PER_HEAD_MEAN_OVERHEAD,
        "second_moment": products * FP64 + PER_HEAD_MEAN_OVERHEAD if linear else 0,
        "step_recording": 2 * heads * head_dim * FP32 + 3 * heads * FP32 + (products * FP32 if linear else 0),
        "step_head_outputs": num_layers * batch_size * sequence_length * width * activation,
        "entropy_step_attention": batch_size * num_heads * sequence_length**2
        * (2 * FP32 + (activation if activation != FP32 else 0)),
        "pruning_event": width * width * (FP64 + FP64 + FP32) if linear else 0,
        "teacher": 0,
    }
    if distillation_teacher == "loaded":
        states["teacher"] = _parameter_bytes(model)
    elif distillation_teacher == "before_pruning":
        wrapped = meta_model(config, dtype, lora) if lora is not None else model
        states["teacher"] = _parameter_bytes(wrapped) + gates + states["reconstruction"]
    return states


def model_bytes(config: PretrainedConfig, lora: Any = None, dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """What the model itself costs, for scale: ``weights`` (in ``dtype``) and ``trainable_with_adamw`` (the
    trainable parameters' fp32 gradient and AdamW's two moments: every weight of a full fine-tune, the
    adapters of a LoRA one, whose adapters are counted in ``weights`` too)."""
    model = meta_model(config, dtype, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"weights": _parameter_bytes(model), "trainable_with_adamw": trainable * 3 * FP32}


def _parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct parameters (tied weights once)."""
    unique = {id(p): p for p in model.parameters()}
    return sum(p.numel() * p.element_size() for p in unique.values())
