"""What each head writes into its output projection, recorded inside the model's own forward and backward passes.

While a ``HeadOutputRecording`` is open, two extra forward pre-hooks sit around each layer's gate hook on the
output projection (whose input is ``[B, T, H * D]``: every head's output side by side):

- before the gate: the heads' outputs ``o[b, t, h, :]`` as the attention computed them, summed over tokens
  (their mean is what output compensation puts in place of a pruned head), and on request their products
  ``o o^T`` summed likewise (what linear compensation regresses on, ``reconstruction.py``);
- after the gate: a gradient hook on the gated input, so that the backward pass gives each example's gate
  gradient ``dL/dg[b, h] = sum_t <dL/dx[b, t, h, :], o[b, t, h, :]>`` (``x`` the gated input). Its absolute value,
  averaged over examples, is the head importance of Michel et al. (2019): the expectation over examples of
  ``|dL/dg|``, where the batch gradient ``|sum_b dL/dg[b]|`` lets examples cancel;
- from the same backward, each example's first-order change of the loss when a head's gated output ``x = g * o``
  is replaced by its mean output ``m`` (what output compensation writes): ``sum_t <dL/dx[b, t, h, :], x[b, t, h, :]
  - m[h, :]>``, whose absolute value averaged over examples scores a head for pruning with compensation. ``m`` is
  the mean over the positions recorded before (``prior_sums``) and in this pass.

Padding positions count like tokens here (the library's data packs full blocks; a user's padded batches would
bias the mean towards what heads write at padding).

Notation: B batch, T positions, L layers, H query heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from sentinel_lightning.gates import HeadGates, find_gates
from sentinel_lightning.standalone.families import output_projections


@dataclass(frozen=True)
class ExampleImportance:
    """Per-example importances summed over examples, and how many examples they sum.

    Attributes:
        plain: ``[L, H]``: ``|dL/dg|`` of each example, summed (``example_importance``).
        compensated: ``[L, H]``: ``|sum_t <dL/dx, x - m>|`` of each example, summed (``compensated_importance``).
        examples: Number of examples summed.
    """

    plain: torch.Tensor
    compensated: torch.Tensor
    examples: int

    def __add__(self, other: ExampleImportance) -> ExampleImportance:
        return ExampleImportance(
            self.plain + other.plain, self.compensated + other.compensated, self.examples + other.examples
        )

    def divided(self, scale: float | torch.Tensor) -> ExampleImportance:
        """The importances divided by ``scale`` (a loss scale the backward ran under), the same examples."""
        return ExampleImportance(self.plain / scale, self.compensated / scale, self.examples)


class HeadOutputRecording:
    """Records every head's output sum and per-example gate gradient while open (one forward and backward).

    Attributes:
        output_sums: ``[L, H, D]``: each head's output summed over every position recorded (fp32, on the gates'
            device, like the other sums: the hooks never synchronise with the host).
        positions: Number of positions (``B * T``) summed into ``output_sums``.
        example_importance: ``[L, H]``: ``|dL/dg|`` of each example summed over examples (filled by backward).
        example_gradient: ``[L, H]``: the signed per-example gradients summed over examples (equal to the gates'
            gradient for active heads; a check of the bookkeeping).
        compensated_importance: ``[L, H]``: ``|sum_t <dL/dx, x - m>|`` of each example summed over examples, the
            first-order loss change of replacing the head's output by its mean ``m`` (filled by backward).
        output_products: ``[L, H * D, H * D]``: ``o o^T`` summed over positions (each layer's heads flattened), or
            None unless ``products=True``.
        examples: Number of examples whose gradients were recorded.

    Args:
        model: A gated causal LM (see ``attach_gates``).
        prior_sums: ``[L, H, D]`` output sums of earlier passes (e.g. the steps since the last pruning), or None.
        prior_positions: Number of positions summed into ``prior_sums``.
        products: Also sum the outputs' products ``o o^T`` (``output_products``).
    """

    def __init__(
        self,
        model: nn.Module,
        prior_sums: torch.Tensor | None = None,
        prior_positions: float = 0,
        products: bool = False,
    ) -> None:
        gates = find_gates(model)
        if gates is None:
            raise ValueError(f"HeadOutputRecording needs a gated model; {type(model).__name__} has no HeadGates.")
        self.model = model
        self.gates: HeadGates = gates
        num_layers, num_heads, head_dim = gates.num_layers, gates.num_heads, gates.head_dim
        device = gates.values.device
        self.output_sums = torch.zeros(num_layers, num_heads, head_dim, device=device)
        self.positions = 0
        self.example_importance = torch.zeros(num_layers, num_heads, device=device)
        self.example_gradient = torch.zeros(num_layers, num_heads, device=device)
        self.compensated_importance = torch.zeros(num_layers, num_heads, device=device)
        self.examples = 0
        self.prior_sums = None if prior_sums is None else prior_sums.detach().to(device, torch.float32)
        self.prior_positions = float(prior_positions)
        size = num_heads * head_dim
        self.output_products = torch.zeros(num_layers, size, size, device=device) if products else None
        self._outputs: dict[int, torch.Tensor] = {}  # layer -> o [B, T, H, D] of the latest forward
        self._handles: list[RemovableHandle] = []

    def take_example_importance(self) -> ExampleImportance:
        """The per-example importances recorded so far, which the recording then starts afresh (zeros, no examples;
        ``example_gradient`` and the output sums go on): one optimizer step takes the backward passes before it."""
        taken = ExampleImportance(self.example_importance, self.compensated_importance, self.examples)
        self.example_importance = torch.zeros_like(taken.plain)
        self.compensated_importance = torch.zeros_like(taken.compensated)
        self.examples = 0
        return taken

    def start(self) -> HeadOutputRecording:
        """Registers the hooks; returns ``self``."""
        for layer, projection in enumerate(output_projections(self.model)):
            self._handles.append(projection.register_forward_pre_hook(self._before_gate(layer), prepend=True))
            self._handles.append(projection.register_forward_pre_hook(self._after_gate(layer)))
        return self

    def stop(self) -> None:
        """Removes exactly the hooks ``start`` registered and frees the kept outputs."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()

    def __enter__(self) -> HeadOutputRecording:
        return self.start()

    def __exit__(self, *exception) -> None:
        self.stop()

    def _heads(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.unflatten(-1, (self.gates.num_heads, self.gates.head_dim))  # [B, T, H * D] -> [B, T, H, D]

    def _before_gate(self, layer: int):
        def hook(module: nn.Module, args: tuple) -> None:
            outputs = self._heads(args[0]).detach()  # [B, T, H, D]
            with torch.autocast(outputs.device.type, enabled=False):  # fp32 sums, also under bf16-mixed
                self.output_sums[layer] += outputs.float().sum(dim=(0, 1)).to(self.output_sums.device)
                if self.output_products is not None:
                    flat = outputs.float().flatten(0, 1).flatten(1)  # [B * T, H * D]
                    self.output_products[layer] += (flat.T @ flat).to(self.output_products.device)
            if layer == 0:
                self.positions += outputs.shape[0] * outputs.shape[1]
            if torch.is_grad_enabled():
                self._outputs[layer] = outputs

        return hook

    def _after_gate(self, layer: int):
        def hook(module: nn.Module, args: tuple) -> None:
            gated = args[0]  # [B, T, H * D]
            if gated.requires_grad and layer in self._outputs:
                gated.register_hook(self._gradient_hook(layer))

        return hook

    def _gradient_hook(self, layer: int):
        def hook(gradient: torch.Tensor) -> None:
            outputs = self._outputs.pop(layer, None)
            if outputs is None:
                return
            gradient = self._heads(gradient).float()  # dL/dx [B, T, H, D]
            active = self.gates.active[layer].to(gradient.dtype)  # [H]: a pruned gate has no importance
            per_example = torch.einsum("bthd,bthd->bh", gradient, outputs.float()) * active  # dL/dg [B, H]
            value = self.gates.values[layer].detach().to(gradient.dtype)  # [H]
            shift = torch.einsum("bhd,hd->bh", gradient.sum(dim=1), self._mean_output(layer))  # sum_t <dL/dx, m>
            compensated = (per_example * value - shift) * active  # [B, H]
            self.example_importance[layer] += per_example.abs().sum(dim=0).to(self.example_importance.device)
            self.example_gradient[layer] += per_example.sum(dim=0).to(self.example_gradient.device)
            self.compensated_importance[layer] += compensated.abs().sum(dim=0).to(self.compensated_importance.device)
            if layer == 0:
                self.examples += per_example.shape[0]

        return hook

    def _mean_output(self, layer: int) -> torch.Tensor:
        """``m`` ``[H, D]``: the layer's mean head outputs over the prior positions and this pass's."""
        sums, positions = self.output_sums[layer], self.positions + self.prior_positions
        if self.prior_sums is not None:
            sums = sums + self.prior_sums[layer]
        return sums / max(positions, 1.0)
