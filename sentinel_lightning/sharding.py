"""Fully sharded data parallel training (FSDP2) of a gated model: Lightning's ``ModelParallelStrategy``.

``shard_gated_model`` shards every decoder layer and the rest of the causal LM with ``fully_shard`` over the data-
parallel mesh, except the gates: ``HeadGates.values`` ``[L, H]`` stays one plain, replicated tensor on every rank, so
the callbacks read and write ``values``, ``values.grad`` and ``values[l, h]`` exactly as in one process or under DDP.
FSDP does not reduce a parameter it ignores, so a hook averages the gates' gradient over the ranks as soon as it is
accumulated (what DDP does for every parameter). The gates' buffers (active, compensation, reconstruction, ...) are
not parameters: FSDP never shards buffers. Gradient clipping must then add the norms of sharded (``DTensor``) and
plain gradients: ``clip_gradients``.

``GatedLanguageModel.configure_model`` does both; a user's own module calls ``shard_gated_model(self, mesh)`` in its
``configure_model`` and ``clip_gradients`` in ``configure_gradient_clipping``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from sentinel_lightning.gates import HeadGates, find_causal_lm, find_gates
from sentinel_lightning.standalone.families import family_of


def is_sharded(parameter: torch.Tensor) -> bool:
    """Whether ``parameter`` (or a gradient) is a ``DTensor``, as ``fully_shard`` leaves the ones it manages."""
    from torch.distributed.tensor import DTensor

    return isinstance(parameter, DTensor)


def require_whole_gates(trainer, gates: HeadGates, owner: str) -> None:
    """Raises a ``ValueError`` naming ``owner`` when the gates are not whole on this rank: sharded by
    ``fully_shard`` (``values`` a ``DTensor``), or flattened into shards by ``FSDPStrategy`` (FSDP1)."""
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(trainer.strategy, FSDPStrategy):
        raise ValueError(
            f"{owner}: strategy=FSDPStrategy (FSDP1) flattens the gates into its shards, so no rank holds the "
            "[num_layers, num_heads] gates the callbacks read and write. Use ModelParallelStrategy(data_parallel_size="
            "<devices>, tensor_parallel_size=1): FSDP2, with the gates kept whole (GatedLanguageModel.configure_model)."
        )
    if is_sharded(gates.values):
        raise ValueError(
            f"{owner}: HeadGates.values is sharded (a DTensor), so no rank holds the [num_layers, num_heads] gates "
            "the callbacks read and write. Shard the model with sentinel_lightning.sharding.shard_gated_model(module, "
            "mesh) in configure_model, which keeps the gates whole on every rank."
        )


def data_parallel_mesh(mesh):
    """The one-dimensional data-parallel mesh of ``ModelParallelStrategy``'s device mesh (or a 1-D mesh as is).

    Raises:
        ValueError: For a tensor-parallel dimension larger than 1 (the gates and recordings read whole heads).
    """
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"tensor_parallel_size={mesh['tensor_parallel'].size()}: tensor parallelism splits attention heads "
            "across ranks, which the gates and head metrics do not support. Use "
            "ModelParallelStrategy(data_parallel_size=<number of devices>, tensor_parallel_size=1)."
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def shard_gated_model(module: nn.Module, mesh) -> HeadGates:
    """Shards the gated causal LM inside ``module`` with FSDP2, keeping its gates whole on every rank.

    Args:
        module: A LightningModule or model holding a gated causal LM (``attach_gates``).
        mesh: ``LightningModule.device_mesh`` under ``ModelParallelStrategy``, or a 1-D data-parallel mesh.

    Returns:
        The gates, ``values`` ``[num_layers, num_heads]`` a plain parameter whose gradient is averaged over ranks.

    Raises:
        ValueError: Without gates, or for a tensor-parallel mesh.
    """
    from torch.distributed.fsdp import fully_shard

    gates = find_gates(module)
    if gates is None:
        raise ValueError(
            f"{type(module).__name__} holds no HeadGates: attach them (attach_gates, or the callbacks' setup, which "
            "runs before configure_model) before sharding."
        )
    mesh = data_parallel_mesh(mesh)
    model = find_causal_lm(module)
    for layer in family_of(model).decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params={gates.values})
    if mesh.size() > 1:
        group = mesh.get_group()
        gates.values.register_post_accumulate_grad_hook(
            lambda values: dist.all_reduce(values.grad, op=dist.ReduceOp.AVG, group=group)
        )
    return gates


def clip_gradients(optimizer: torch.optim.Optimizer, max_value: float, algorithm: str = "norm") -> None:
    """Clips the gradients of ``optimizer``'s parameters, sharded (``DTensor``) and plain ones together.

    ``torch.nn.utils.clip_grad_norm_`` refuses a mixture; here the total norm is that of the sharded gradients
    (reduced over the ranks) and of the plain ones (the same on every rank), so every rank scales by the same factor.

    Args:
        optimizer: The optimizer whose parameters' gradients are clipped.
        max_value: The largest norm (``algorithm="norm"``) or absolute value (``"value"``).
        algorithm: ``"norm"`` or ``"value"`` (Lightning's ``gradient_clip_algorithm``).
    """
    gradients = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    sharded = [g for g in gradients if is_sharded(g)]
    plain = [g for g in gradients if not is_sharded(g)]
    if algorithm == "value":
        for gradient in gradients:
            gradient.clamp_(-max_value, max_value)
        return
    if algorithm != "norm":
        raise ValueError(f"gradient_clip_algorithm={algorithm!r} is not one of 'norm', 'value'.")
    norms = [torch.nn.utils.get_total_norm(plain)]
    if sharded:
        norms.append(torch.nn.utils.get_total_norm(sharded).full_tensor())
    total = float(torch.linalg.vector_norm(torch.stack(norms)))
    scale = min(1.0, max_value / (total + 1e-6))  # clip_grad_norm_'s coefficient
    if scale < 1.0:
        for gradient in gradients:  # one by one: clip_grads_with_norm_ leaves DTensor gradients unscaled (torch 2.13)
            gradient.mul_(scale)


def consolidate_checkpoint(folder: str, output_file: str) -> str:
    """Writes the one-file Lightning checkpoint of a sharded ``ModelParallelStrategy`` checkpoint folder.

    The folder (``save_distributed_checkpoint=True``, Lightning's default) holds one ``torch.distributed.checkpoint``
    shard per rank and ``meta.pt`` (epoch, loops, callbacks, hyperparameters). The file has the full ``state_dict``
    and ``optimizer_states`` keyed by parameter name, which ``export`` and ``ModelParallelStrategy`` read.
    (``lightning.pytorch.utilities.consolidate_checkpoint`` expects the older ``FSDPStrategy`` layout and fails on
    this one.)

    Args:
        folder: The checkpoint folder.
        output_file: Where to write the checkpoint.

    Returns:
        ``output_file``.
    """
    import os

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    metadata = os.path.join(folder, "meta.pt")
    if not os.path.isfile(metadata):
        raise ValueError(
            f"ckpt_path={folder!r} is a folder without meta.pt, not a sharded Lightning checkpoint "
            "(ModelParallelStrategy with save_distributed_checkpoint=True writes one); give a checkpoint file or "
            "such a folder."
        )
    dcp_to_torch_save(folder, output_file)
    shards = torch.load(output_file, map_location="cpu", weights_only=False)  # {"state_dict", "optimizer_0", ...}
    checkpoint = torch.load(metadata, map_location="cpu", weights_only=False)
    checkpoint["state_dict"] = shards.pop("state_dict")
    optimizers = sorted((key for key in shards if key.startswith("optimizer_")), key=lambda key: int(key[10:]))
    checkpoint["optimizer_states"] = [shards[key] for key in optimizers]
    torch.save(checkpoint, output_file)
    return output_file
