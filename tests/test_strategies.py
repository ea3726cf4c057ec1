import pytest
import torch

from sentinel_lightning.strategies import RandomScore, resolve_strategy, select_heads

METRICS = {
    "entropy": torch.tensor([[3.0, 1.0, 2.0], [0.5, 2.5, 1.5]]),
    "grad_norm": torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.05, 0.7]]),
}
ALL = torch.ones(2, 3, dtype=torch.bool)


def test_entropy_prunes_highest_entropy_first():
    assert select_heads(resolve_strategy("entropy")(METRICS), ALL, 3) == [(0, 0), (1, 1), (0, 2)]


def test_gradient_prunes_lowest_grad_norm_first():
    assert select_heads(resolve_strategy("gradient")(METRICS), ALL, 3) == [(1, 1), (0, 0), (1, 0)]


def test_layer_scope_spreads_pruning_evenly():
    # Globally, gradient would take two heads of layer 1 before any other; per layer it alternates.
    chosen = select_heads(resolve_strategy("gradient")(METRICS), ALL, 2, scope="layer")
    assert sorted(chosen) == [(0, 0), (1, 1)]


def test_min_active_heads_per_layer_and_already_pruned_and_protected():
    scores = torch.tensor([[9.0, 8.0, 7.0], [1.0, 2.0, 3.0]])
    active = ALL.clone()
    active[0, 0] = False
    protected = torch.zeros(2, 3, dtype=torch.bool)
    protected[1, 2] = True
    chosen = select_heads(scores, active, 4, min_active_heads_per_layer=1, protected=protected)
    assert chosen == [(0, 1), (1, 1), (1, 0)]  # (0, 2) is layer 0's last head; (1, 2) is protected


def test_non_finite_scores_are_never_chosen():
    scores = torch.tensor([[float("nan"), 1.0, float("inf")], [2.0, float("-inf"), 0.5]])
    assert select_heads(scores, ALL, 6, min_active_heads_per_layer=0) == [(1, 0), (0, 1), (1, 2)]


def test_random_is_seeded_and_custom_callables_are_used():
    first, again, other = RandomScore(3)(METRICS), RandomScore(3)(METRICS), RandomScore(4)(METRICS)
    assert torch.equal(first, again) and not torch.equal(first, other) and first.shape == (2, 3)
    custom = resolve_strategy(lambda metrics: -metrics["entropy"])
    assert select_heads(custom(METRICS), ALL, 1) == [(1, 0)]


def test_bad_strategy_and_scope_are_named():
    with pytest.raises(ValueError, match=r"strategy='magnitude'.*entropy.*gradient.*random"):
        resolve_strategy("magnitude")
    with pytest.raises(ValueError, match=r"scope='model'"):
        select_heads(METRICS["entropy"], ALL, 1, scope="model")
