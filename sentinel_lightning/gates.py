"""Per-head gates for Hugging Face causal language models.

Every attention head gets a gate that scales its output right before the attention output projection:
the projection's input ``[batch, seq, num_heads * head_dim]`` is viewed as ``[batch, seq, num_heads, head_dim]``
and head ``h`` of layer ``l`` is multiplied by ``values[l, h] * active[l, h]``. With every gate at 1.0 the model
computes exactly what the plain model computes, whatever attention implementation (eager, SDPA, flash) it runs.

``families.py`` is the only place that knows model families; everything else speaks ``[num_layers, num_heads]``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel

from sentinel_lightning.standalone.families import attention_modules, family_of, head_shape, output_projections
from sentinel_lightning.standalone.pruned_modeling import uniform_layers

GATES_ATTRIBUTE = "head_gates"


class HeadGates(nn.Module):
    """One gate per attention head.

    Attributes:
        values: Learnable gate values, ``[num_layers, num_heads]``, initialised to 1.0.
        active: Bool mask ``[num_layers, num_heads]``; False marks a pruned head.
        values_before_pruning: The value each head's gate had when it was last pruned,
            ``[num_layers, num_heads]``, so that reactivation restores it whatever the optimizer did meanwhile.
        importance_at_pruning: The importance each head had when it was last pruned (NaN if never or unknown),
            ``[num_layers, num_heads]``; reactivation by importance ranks pruned heads by it.
        protected_until: The last epoch at whose end each head must not be pruned (-1: none),
            ``[num_layers, num_heads]``; reactivation protects the heads it gives back.
        fading: The share of its own output a pruned head still writes while it fades out, ``[num_layers,
            num_heads]`` in [0, 1] (0 for every active head and every fully pruned one). ``HeadPruning(fade_steps=n)``
            sets it to 1 for the heads it prunes and lowers it by ``1 / n`` every optimizer step: a fading head
            writes ``fading * values * o + (1 - fading) * compensation``. ``compaction.compact`` refuses a model
            with a head still fading.
        compensation: What a pruned head writes in place of its output, ``[num_layers, num_heads, head_dim]``
            (zeros: a pruned head writes nothing). ``HeadPruning(compensate="mean")`` sets it to the head's mean
            output (FLAP's bias compensation) and ``compaction.compact`` folds it into the output projection's
            bias. It is read only while the head is pruned: reactivation leaves it, and the next pruning of the
            head overwrites it.
        reconstruction: None, or ``[num_layers, num_heads, head_dim, H * D]`` once ``set_linear_compensation`` was
            used: a pruned head ``h`` of layer ``l`` writes ``compensation[l, h] + reconstruction[l, h] @ x``, ``x``
            the layer's gated head outputs flattened (``reconstruction.linear_compensation``). Zero for active
            heads (reactivation clears a head's entry).
        key_value_mix: None, or ``[num_layers, num_heads, K]`` once ``set_key_value_mix`` was used: query head
            ``h`` of layer ``l`` reads the keys and values ``sum_k key_value_mix[l, h, k] * kv_k`` of the layer's
            ``K`` key/value heads (``merging``: merged key/value heads). While it exists every layer's key and
            value projections are expanded to the query heads through it (one-hot rows read as the plain model).

    The buffers are the pruning callbacks' shared per-head state: they travel in the model's ``state_dict`` and
    so in every Lightning checkpoint.
    """

    def __init__(self, num_layers: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        if min(num_layers, num_heads, head_dim) < 1:
            raise ValueError(
                f"HeadGates needs positive sizes, got num_layers={num_layers}, num_heads={num_heads}, "
                f"head_dim={head_dim}."
            )
        self.head_dim = head_dim
        self.values = nn.Parameter(torch.ones(num_layers, num_heads))
        self.register_buffer("active", torch.ones(num_layers, num_heads, dtype=torch.bool))
        self.register_buffer("values_before_pruning", torch.ones(num_layers, num_heads))
        self.register_buffer("importance_at_pruning", torch.full((num_layers, num_heads), float("nan")))
        self.register_buffer("protected_until", torch.full((num_layers, num_heads), -1, dtype=torch.long))
        self.register_buffer("fading", torch.zeros(num_layers, num_heads))
        self.register_buffer("compensation", torch.zeros(num_layers, num_heads, head_dim))
        self.register_buffer("reconstruction", None)  # created by enable_linear_compensation (or a loaded state)
        self.register_buffer("key_value_mix", None)  # created by set_key_value_mix (or a loaded state)
        # The handles of the hooks ``register_hooks`` put on the model: a plain list, not state; ``copy.deepcopy``
        # and pickling keep them pointing at the copy's hooks.
        self._hook_handles: list[RemovableHandle] = []
        # The gradient of a pruned head's gate is exactly zero: values * active has no gradient where active is False.

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Checkpoints written before ``compensation`` existed load with zeros (pruned heads wrote nothing then).
        state_dict.setdefault(f"{prefix}compensation", torch.zeros_like(self.compensation))
        state_dict.setdefault(f"{prefix}fading", torch.zeros_like(self.fading))  # so did checkpoints before fading
        for name in ("reconstruction", "key_value_mix"):  # created lazily: a state that has them brings them
            saved = state_dict.get(f"{prefix}{name}")
            if saved is not None and getattr(self, name) is None:
                setattr(self, name, torch.zeros_like(saved, device=self.compensation.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def num_layers(self) -> int:
        return self.values.shape[0]

    @property
    def num_heads(self) -> int:
        return self.values.shape[1]

    @property
    def num_active(self) -> int:
        return int(self.active.sum())

    @property
    def sparsity(self) -> float:
        """Fraction of heads pruned."""
        return 1.0 - self.num_active / self.active.numel()

    def effective(self) -> torch.Tensor:
        """The gates the model applies, ``[num_layers, num_heads]``: ``values * active`` (exactly 0 when pruned)."""
        return self.values * self.active

    def pruned_heads(self) -> list[tuple[int, int]]:
        """The pruned heads as ``(layer, head)`` pairs, in layer-major order."""
        return [tuple(pair) for pair in (~self.active).nonzero().tolist()]

    def _check_heads(self, heads: Iterable[tuple[int, int]], argument: str) -> list[tuple[int, int]]:
        heads = [(int(layer), int(head)) for layer, head in heads]
        for layer, head in heads:
            if not (0 <= layer < self.num_layers and 0 <= head < self.num_heads):
                raise ValueError(
                    f"{argument} contains ({layer}, {head}), outside the gates' [num_layers={self.num_layers}, "
                    f"num_heads={self.num_heads}] grid."
                )
        return heads

    @torch.no_grad()
    def prune(
        self,
        heads: Iterable[tuple[int, int]],
        importance: torch.Tensor | None = None,
        compensation: torch.Tensor | None = None,
    ) -> int:
        """Sets the gates of ``heads`` (``(layer, head)`` pairs) to exactly 0, remembering their values.

        Args:
            heads: The heads to prune; already pruned ones are left as they are.
            importance: ``[num_layers, num_heads]`` importance to remember for the newly pruned heads, or None.
            compensation: ``[num_layers, num_heads, head_dim]``: what each newly pruned head writes instead of its
                output (its mean output: output compensation); a head whose entry is not finite writes zero.
                None: newly pruned heads write zero.

        Returns:
            The number of newly pruned heads whose compensation was not finite (and is zero instead).
        """
        missing = 0
        for layer, head in self._check_heads(heads, "heads"):
            if not self.active[layer, head]:
                continue
            self.values_before_pruning[layer, head] = self.values[layer, head]
            self.active[layer, head] = False
            if importance is not None:
                self.importance_at_pruning[layer, head] = importance[layer, head]
            constant = None if compensation is None else compensation[layer, head].to(self.compensation)  # [D]
            finite = constant is not None and bool(torch.isfinite(constant).all())
            missing += compensation is not None and not finite
            self.compensation[layer, head] = constant if finite else 0.0
        return missing

    @torch.no_grad()
    def set_linear_compensation(self, layer: int, constants: torch.Tensor, matrix: torch.Tensor) -> None:
        """Makes the pruned heads of ``layer`` write an affine prediction from the layer's active heads.

        Args:
            layer: The layer.
            constants: ``[H, D]``: ``compensation`` of the layer's pruned heads (entries of active heads ignored).
            matrix: ``[H * D, H * D]``: the layer's prediction (rows of active heads must be zero), stored as
                ``reconstruction[layer]`` ``[H, D, H * D]``.
        """
        self.enable_linear_compensation()
        pruned = ~self.active[layer]
        self.compensation[layer, pruned] = constants.to(self.compensation)[pruned.to(constants.device)]
        self.reconstruction[layer] = matrix.to(self.reconstruction).view(self.num_heads, self.head_dim, -1)

    def enable_linear_compensation(self) -> None:
        """Creates ``reconstruction`` ``[L, H, D, H * D]``, all zeros (no pruned head predicts anything yet), unless
        it exists. ``HeadPruning(compensate="linear")`` calls it in ``setup``, so that the buffer exists before any
        checkpoint is loaded: a sharded strategy's loader fills only the buffers the module already has."""
        if self.reconstruction is None:
            size = self.num_heads * self.head_dim
            self.reconstruction = self.compensation.new_zeros(self.num_layers, self.num_heads, self.head_dim, size)

    @torch.no_grad()
    def set_key_value_mix(self, layer: int, mix: torch.Tensor, group_size: int) -> None:
        """Makes the query heads of ``layer`` read mixes of its key/value heads (merged key/value heads).

        Args:
            layer: The layer.
            mix: ``[H, K]``: row ``h`` weighs the ``K`` key/value heads query head ``h`` reads.
            group_size: ``G = H // K`` of the model: the other layers keep reading key/value head ``h // G``.
        """
        num_kv_heads = self.num_heads // group_size
        if mix.shape != (self.num_heads, num_kv_heads):
            raise ValueError(f"mix is {list(mix.shape)}; layer {layer} needs [{self.num_heads}, {num_kv_heads}].")
        if self.key_value_mix is None:
            reads = torch.arange(self.num_heads, device=self.values.device) // group_size  # [H]
            identity = nn.functional.one_hot(reads, num_kv_heads).to(self.values.dtype)  # [H, K]
            self.key_value_mix = identity.expand(self.num_layers, -1, -1).clone()  # [L, H, K]
        self.key_value_mix[layer] = mix.to(self.key_value_mix)

    def merged_layers(self) -> torch.Tensor:
        """Bool ``[num_layers]``: layers whose query heads read merged key/value heads (``set_key_value_mix``)."""
        if self.key_value_mix is None:
            return torch.zeros(self.num_layers, dtype=torch.bool, device=self.active.device)
        num_kv_heads = self.key_value_mix.shape[-1]
        reads = torch.arange(self.num_heads, device=self.active.device) // (self.num_heads // num_kv_heads)
        identity = nn.functional.one_hot(reads, num_kv_heads).to(self.key_value_mix)  # [H, K]
        return (self.key_value_mix != identity).flatten(1).any(dim=1)

    @torch.no_grad()
    def reactivate(self, heads: Iterable[tuple[int, int]]) -> None:
        """Gives ``heads`` back the gate value they had before they were pruned (and no prediction to write)."""
        for layer, head in self._check_heads(heads, "heads"):
            if not self.active[layer, head]:
                self.values[layer, head] = self.values_before_pruning[layer, head]
                self.active[layer, head] = True
                self.fading[layer, head] = 0.0
                if self.reconstruction is not None:
                    self.reconstruction[layer, head] = 0.0

    @torch.no_grad()
    def protect(self, heads: Iterable[tuple[int, int]], until_epoch: int) -> None:
        """Keeps ``heads`` from being pruned at the end of every epoch up to ``until_epoch`` (inclusive)."""
        for layer, head in self._check_heads(heads, "heads"):
            self.protected_until[layer, head] = max(int(self.protected_until[layer, head]), until_epoch)

    def protected(self, epoch: int) -> torch.Tensor:
        """Bool ``[num_layers, num_heads]``: heads that must not be pruned at the end of ``epoch``."""
        return self.protected_until >= epoch

    def register_hooks(self, model: nn.Module) -> None:
        """Makes ``model`` apply these gates: a pre-hook on every output projection, and for families that merge
        key/value heads the hooks of ``key_value_mix`` on the key, value and attention modules (idle until a merge).
        ``remove_hooks`` removes exactly these."""
        self._hook_handles += [
            projection.register_forward_pre_hook(_GateHook(self, layer))
            for layer, projection in enumerate(output_projections(model))
        ]
        family = family_of(model)
        if family.merges_key_values:
            group_size = family.group_size(model.config)
            for layer, attention in enumerate(attention_modules(model)):
                self._hook_handles += [
                    attention.k_proj.register_forward_hook(_KeyValueMixHook(self, layer)),
                    attention.v_proj.register_forward_hook(_KeyValueMixHook(self, layer)),
                    attention.register_forward_pre_hook(_KeyValueGroupsHook(self, group_size)),
                ]

    def remove_hooks(self) -> None:
        """Removes exactly the hooks ``register_hooks`` registered."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, num_heads={self.num_heads}, active={self.num_active}"


class _GateHook:
    """Forward pre-hook of an output projection: scales each head's slice of its input by the layer's gates.

    Head ``h``'s slice ``x[..., h, :]`` of the input ``[batch, seq, num_heads, head_dim]`` becomes
    ``o[..., h, :] * values[l, h]`` while the head is active and ``compensation[l, h]`` while it is pruned
    (computed as ``o * (values * active) + compensation * ~active``: with zero compensation, exactly zero),
    plus, with linear compensation, ``reconstruction[l] @ x`` (``x`` the gated outputs; nonzero at pruned heads).
    A pruned head still fading out (``fading[l, h] = f > 0``) writes ``f`` of its gated output and ``1 - f`` of
    what it writes once pruned; its gate value gets no gradient either way.

    A callable object rather than a closure so that ``copy.deepcopy`` and pickling keep it pointing at the
    copied model's gates.
    """

    def __init__(self, gates: HeadGates, layer: int) -> None:
        self.gates = gates
        self.layer = layer

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        hidden, *rest = args  # [batch, seq, num_heads * head_dim]
        active = self.gates.active[self.layer]  # [num_heads]
        values = self.gates.values[self.layer]  # [num_heads]
        fading = self.gates.fading[self.layer]  # [num_heads]: 0 at active heads
        gate = values * active + values.detach() * fading  # [num_heads]
        absent = 1.0 - active.to(fading.dtype) - fading  # [num_heads]: the share of its replacement a head writes
        constant = self.gates.compensation[self.layer] * absent.unsqueeze(-1)  # [num_heads, head_dim]
        heads = hidden.unflatten(-1, (self.gates.num_heads, self.gates.head_dim))  # [batch, seq, H, D]
        gated = (heads * gate.to(hidden.dtype).unsqueeze(-1)).flatten(-2)  # [batch, seq, H * D]
        hidden = gated + constant.to(hidden.dtype).flatten()
        reconstruction = self.gates.reconstruction
        if reconstruction is not None:  # rows of active heads are zero; a fading head's scaled by its absent share
            rows = reconstruction[self.layer] * absent.view(-1, 1, 1)  # [H, D, H * D]
            hidden = hidden + gated @ rows.flatten(0, 1).to(hidden.dtype).T
        return (hidden, *rest)


class _KeyValueMixHook:
    """Forward hook of a key or value projection: ``[batch, seq, K * D]`` -> ``[batch, seq, H * D]`` through the
    layer's ``key_value_mix`` once it exists (the attention then runs with one key/value head per query head,
    ``_KeyValueGroupsHook``); nothing before."""

    def __init__(self, gates: HeadGates, layer: int) -> None:
        self.gates = gates
        self.layer = layer

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        mix = self.gates.key_value_mix
        if mix is None:
            return None
        heads = output.unflatten(-1, (mix.shape[-1], self.gates.head_dim))  # [batch, seq, K, D]
        return torch.einsum("hk,btkd->bthd", mix[self.layer].to(output.dtype), heads).flatten(-2)  # [.., H * D]


class _KeyValueGroupsHook:
    """Forward pre-hook of an attention module: one key/value head per query head while ``key_value_mix`` exists
    (the mixed projections already give every query head its own), the model's own group size otherwise."""

    def __init__(self, gates: HeadGates, group_size: int) -> None:
        self.gates = gates
        self.group_size = group_size

    def __call__(self, module: nn.Module, args: tuple) -> None:
        module.num_key_value_groups = 1 if self.gates.key_value_mix is not None else self.group_size


def find_gates(module: nn.Module) -> HeadGates | None:
    """Returns the ``HeadGates`` inside ``module`` (a model or a LightningModule holding one), or None."""
    for submodule in module.modules():
        if isinstance(submodule, HeadGates):
            return submodule
    return None


def attach_gates(model: nn.Module) -> HeadGates:
    """Puts one gate on every attention head of a Hugging Face causal LM.

    The gates become the submodule ``model.head_gates``, so they travel in ``model.state_dict()`` and in
    Lightning checkpoints; their hooks are ``HeadGates.register_hooks``', which ``detach_gates`` removes. Attaching
    twice returns the gates already there.

    Args:
        model: A causal LM of a supported family (see ``families.FAMILIES``).

    Returns:
        The model's ``HeadGates``, values ``[num_layers, num_heads]`` all 1.0.

    Raises:
        ValueError: For a model compacted to layers of different shapes (``pruned_modeling.uniform_layers``).
    """
    existing = getattr(model, GATES_ATTRIBUTE, None)
    if isinstance(existing, HeadGates):
        return existing
    num_layers, num_heads, head_dim = head_shape(model)  # refuses an unsupported model by name
    if not uniform_layers(model):
        raise ValueError(
            f"{type(model).__name__} was compacted to layers of different shapes (config.kept_heads = "
            f"{model.config.kept_heads}); gating and re-pruning such a model is not supported. Prune the model it "
            "was compacted from, or one compacted with scope='uniform'."
        )
    reference = next(model.parameters())
    gates = HeadGates(num_layers, num_heads, head_dim).to(reference.device)
    model.add_module(GATES_ATTRIBUTE, gates)
    gates.register_hooks(model)
    return gates


def detach_gates(model: nn.Module) -> None:
    """Removes the gates ``attach_gates`` put on ``model`` and exactly the hooks it registered.

    Does not fold the gates into the weights (``compaction.compact`` does). Other hooks stay.
    """
    gates = getattr(model, GATES_ATTRIBUTE, None)
    if not isinstance(gates, HeadGates):
        return
    gates.remove_hooks()
    if gates.key_value_mix is not None:  # the attention read one key/value head per query head while mixing
        group_size = family_of(model).group_size(model.config)
        for attention in attention_modules(model):
            attention.num_key_value_groups = group_size
    delattr(model, GATES_ATTRIBUTE)


def find_causal_lm(module: nn.Module) -> PreTrainedModel:
    """The Hugging Face model inside ``module``: the module itself, or the first ``PreTrainedModel`` it holds.

    The one unwrapper of the library: a ``GatedLanguageModel``, a user's own LightningModule or a plain model.
    """
    for submodule in module.modules():  # the module itself comes first
        if isinstance(submodule, PreTrainedModel):
            return submodule
    raise ValueError(
        f"{type(module).__name__} holds no Hugging Face PreTrainedModel; pass a causal LM or a LightningModule "
        "(such as GatedLanguageModel) that holds one."
    )


def find_or_attach_gates(module: nn.Module) -> HeadGates:
    """Returns the gates inside ``module``, attaching them to its first Hugging Face ``PreTrainedModel`` if needed.

    This lets the callbacks work on a user's own LightningModule that holds a plain Hugging Face model.
    """
    gates = find_gates(module)
    if gates is not None:
        return gates
    try:
        causal_lm = find_causal_lm(module)
    except ValueError as error:
        raise ValueError(
            f"{type(module).__name__} holds no HeadGates and no transformers.PreTrainedModel to attach them to; "
            "give it a Hugging Face causal LM or call attach_gates(model) yourself."
        ) from error
    return attach_gates(causal_lm)
