import pytest
import torch

from sentinel_lightning.strategies import (
    STRATEGIES,
    RandomScore,
    needs_head_metrics,
    pruning_step,
    reachable_count,
    resolve_strategy,
    select_heads,
    uniform_shape,
)

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


def test_a_strategy_reads_head_metrics_unless_it_declares_otherwise():
    assert not needs_head_metrics(RandomScore(0)) and needs_head_metrics(lambda metrics: -metrics["entropy"])
    assert all(needs_head_metrics(STRATEGIES[name](0)) for name in STRATEGIES if name != "random")

    def by_position(metrics):
        return torch.zeros(metrics["active"].shape)

    by_position.needs_head_metrics = False
    assert not needs_head_metrics(resolve_strategy(by_position))


def test_bad_strategy_and_scope_are_named():
    with pytest.raises(ValueError, match=r"strategy='magnitude'.*entropy.*gradient.*random"):
        resolve_strategy("magnitude")
    with pytest.raises(ValueError, match=r"scope='model'"):
        select_heads(METRICS["entropy"], ALL, 1, scope="model")


# ----------------------------------------------------------------------------------------------------------------
# Pruning units: a key/value group (G query heads that read one key/value head) or a whole layer


def without(active, heads):
    """A copy of ``active`` with ``heads`` pruned."""
    active = active.clone()
    for layer, head in heads:
        active[layer, head] = False
    return active


def test_groups_are_chosen_whole_by_the_mean_of_their_active_heads():
    scores = torch.tensor([[10.0, -10.0, 3.0, 3.0]])  # H=4, G=2: group 0 has the best head, group 1 the best mean
    active = torch.ones(1, 4, dtype=torch.bool)
    assert select_heads(scores, active, 1, min_active_heads_per_layer=0) == [(0, 0)]
    assert select_heads(scores, active, 2, min_active_heads_per_layer=0, unit="group", group_size=2) == [(0, 2), (0, 3)]
    active[0, 1] = False  # group 0 now scores 10 (its one active head) and is one head
    assert select_heads(scores, active, 1, min_active_heads_per_layer=0, unit="group", group_size=2) == [(0, 0)]


def test_group_counts_round_to_whole_groups_overshooting_at_most_half_a_group():
    scores = torch.arange(12.0).reshape(2, 6)  # H=6, K=3, G=2
    active = torch.ones(2, 6, dtype=torch.bool)

    def pick(count, group_size=2):
        return select_heads(scores, active, count, unit="group", group_size=group_size)

    assert pick(4) == [(1, 4), (1, 5), (1, 2), (1, 3)]
    assert len(pick(3)) == 4 and len(pick(5)) == 6  # ties prune: one head past, half a group
    assert pick(2, group_size=3) == [(1, 3), (1, 4), (1, 5)] and pick(1, group_size=3) == []  # 1 past, not 2
    assert select_heads(scores, active, 2, unit="group", group_size=1) == [(1, 5), (1, 4)]  # G=1: a group is a head


def test_layer_unit_prunes_whole_layers_by_mean_score():
    scores = torch.tensor([[5.0, 0.0, 0.0], [2.0, 2.0, 2.0], [1.0, 1.0, 1.0]])  # layer 1 has the best mean
    active = torch.ones(3, 3, dtype=torch.bool)
    assert select_heads(scores, active, 3, unit="layer") == [(1, 0), (1, 1), (1, 2)]
    assert [len(select_heads(scores, active, count, unit="layer")) for count in (1, 2, 4, 5)] == [0, 3, 3, 6]
    with pytest.raises(ValueError, match=r"unit='layer'.*min_active_heads_per_layer must be 0 or None.*got .*=1"):
        select_heads(scores, active, 3, min_active_heads_per_layer=1, unit="layer")
    for scope in ("layer", "uniform"):
        with pytest.raises(ValueError, match=rf"unit='layer' needs scope='global'.*got scope='{scope}'"):
            select_heads(scores, active, 3, scope=scope, unit="layer")
    with pytest.raises(ValueError, match=r"unit='block' is not one of \('head', 'group', 'layer'\)"):
        select_heads(scores, active, 3, unit="block")
    with pytest.raises(ValueError, match=r"group_size=2 must be a positive divisor of num_heads=3"):
        select_heads(scores, active, 3, unit="group", group_size=2)


def test_units_with_a_protected_or_non_finite_active_head_are_skipped():
    scores = torch.tensor([[9.0, float("nan"), 8.0, 8.0, 7.0, 7.0, 1.0, 1.0]])  # H=8, G=2
    active = torch.ones(1, 8, dtype=torch.bool)
    protected = torch.zeros(1, 8, dtype=torch.bool)
    protected[0, 3] = True
    chosen = select_heads(scores, active, 4, protected=protected, unit="group", group_size=2)
    assert chosen == [(0, 4), (0, 5), (0, 6), (0, 7)]  # group 0 has a NaN head, group 1 a protected one
    active[0, 1] = False  # a pruned head's score does not matter
    assert select_heads(scores, active, 1, protected=protected, unit="group", group_size=2) == [(0, 0)]


def test_min_active_heads_per_layer_counts_query_heads_for_every_unit():
    scores = torch.arange(12.0).reshape(2, 6)  # H=6, G=2
    active = torch.ones(2, 6, dtype=torch.bool)
    # At least 3 query heads per layer: each layer keeps ceil(3 / 2) = 2 groups, so loses at most one.
    chosen = select_heads(scores, active, 8, min_active_heads_per_layer=3, unit="group", group_size=2)
    assert sorted(chosen) == [(0, 4), (0, 5), (1, 4), (1, 5)]
    per_layer = select_heads(scores, active, 8, scope="layer", min_active_heads_per_layer=3, unit="group", group_size=2)
    assert sorted(per_layer) == sorted(chosen)
    assert active.all()  # the caller's mask is left alone


def test_uniform_steps_and_reachable_counts():
    # H=9, K=3: unit "head" prunes one head of every group (3 per layer); a group is 3 heads.
    assert [pruning_step(unit, "global", 9, 3) for unit in ("head", "group", "layer")] == [1, 3, 9]
    assert pruning_step("head", "uniform", 9, 3) == 3 and pruning_step("group", "uniform", 9, 3) == 3
    assert pruning_step("head", "uniform", 4, 1) == 1  # without grouped-query attention: one head per layer
    # 2 layers of 4 heads, G=2: uniform steps of 2 heads per layer, i.e. 4 of 8; ties round up.
    assert [reachable_count(goal, 2, 4, "head", "uniform", 2) for goal in (0.8, 1.9, 2.0, 5.9, 6.0)] == [0, 0, 4, 4, 8]
    assert [reachable_count(goal, 2, 4, "group", "global", 2) for goal in (0.8, 1.0, 2.4, 3.0)] == [0, 2, 2, 4]
    assert reachable_count(0.3 * 10, 2, 5, "head", "global", 1) == 3  # floating-point noise does not move it


@pytest.mark.parametrize(
    "unit, group_size, count, shape",
    [
        ("head", 2, 6, (3, 1)),  # H=6, K=3: one head of every group of every layer
        ("group", 2, 4, (2, 2)),  # one whole group of every layer
        ("head", 3, 4, (2, 2)),  # H=6, K=2: one head of each group
        ("group", 3, 6, (1, 3)),
        ("head", 1, 4, (4, 1)),  # no grouped-query attention: two heads of every layer
        ("head", 2, 5, (3, 1)),  # 5 of 12 heads rounds to 6, the nearest uniform shape
        ("group", 2, 1, (3, 2)),  # 1 rounds to 0
    ],
)
def test_uniform_scope_leaves_every_layer_and_every_kept_group_the_same(unit, group_size, count, shape):
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    active = torch.ones(2, 6, dtype=torch.bool)
    chosen = select_heads(scores, active, count, scope="uniform", unit=unit, group_size=group_size)
    assert uniform_shape(without(active, chosen), group_size) == shape


def test_uniform_scope_takes_each_groups_highest_scoring_heads():
    scores = torch.tensor([[1.0, 2.0, 4.0, 3.0, 5.0, 6.0], [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])  # H=6, K=3
    active = torch.ones(2, 6, dtype=torch.bool)
    chosen = select_heads(scores, active, 6, scope="uniform", unit="head", group_size=2)
    assert chosen == [(0, 1), (0, 2), (0, 5), (1, 0), (1, 2), (1, 4)]
    groups = select_heads(scores, active, 4, scope="uniform", unit="group", group_size=2)
    assert groups == [(0, 4), (0, 5), (1, 0), (1, 1)]


def test_uniform_scope_continues_from_the_shape_there_and_re_evens_after_reactivation():
    scores = torch.arange(16.0).reshape(2, 8)  # H=8, K=2, G=4
    active = torch.ones(2, 8, dtype=torch.bool)
    first = select_heads(scores, active, 4, scope="uniform", group_size=4)
    active = without(active, first)
    assert uniform_shape(active, 4) == (2, 3)
    second = select_heads(scores, active, 4, scope="uniform", group_size=4)  # from 4 to 8 pruned
    assert not set(first) & set(second)
    active = without(active, second)
    assert uniform_shape(active, 4) == (2, 2)
    protected = torch.zeros_like(active)
    active[0, 7] = active[1, 3] = protected[0, 7] = protected[1, 3] = True  # given back by reactivation
    assert uniform_shape(active, 4) is None
    refill = select_heads(scores, active, 2, scope="uniform", protected=protected, group_size=4)
    assert sorted(refill) == [(0, 5), (1, 1)]  # the groups that fell behind, never the protected heads
    assert uniform_shape(without(active, refill), 4) == (2, 2)


def test_a_uniform_shape_reached_in_steps_prunes_the_cheapest_layers_first():
    # 4 layers of 3 groups of 2 heads: the uniform shape one step away prunes a group of every layer (8 heads).
    scores = torch.tensor([[1.0, 1.0, 9.0, 9.0, 2.0, 2.0],  # layer 0's best group scores 9
                           [1.0, 1.0, 2.0, 2.0, 3.0, 3.0],  # 3
                           [8.0, 8.0, 1.0, 1.0, 2.5, 2.5],  # 8, then 2.5
                           [4.0, 4.0, 1.0, 1.0, 2.0, 2.0]])  # 4
    active = torch.ones(4, 6, dtype=torch.bool)
    assert len(select_heads(scores, active, 4, scope="uniform", unit="group", group_size=2)) == 8  # rounds up
    first = select_heads(scores, active, 4, scope="uniform", unit="group", group_size=2, final=False)
    assert first == [(0, 2), (0, 3), (2, 0), (2, 1)]  # the two layers whose best groups score highest
    active = without(active, first)
    assert uniform_shape(active, 2) is None
    second = select_heads(scores, active, 4, scope="uniform", unit="group", group_size=2)
    assert second == [(1, 4), (1, 5), (3, 0), (3, 1)]  # the others catch up; the first two take nothing
    assert uniform_shape(without(active, second), 2) == (2, 2)
    # Between two shapes no layer gets two units ahead: 6 groups over 4 layers are one each, and a second one in
    # the layers whose next group scores highest (layer 2's 2.5, then layer 0 of those tied at 2).
    active = torch.ones(4, 6, dtype=torch.bool)
    both = select_heads(scores, active, 12, scope="uniform", unit="group", group_size=2, final=False)
    assert (~without(active, both)).reshape(4, 3, 2).all(dim=2).sum(dim=1).tolist() == [2, 1, 2, 1]
    assert reachable_count(5.0, 4, 6, "group", "uniform", 2, final=False) == 6  # whole groups, not whole shapes


def test_uniform_scope_respects_the_minimum_and_uniform_shape_spots_differences():
    scores = torch.arange(12.0).reshape(2, 6)
    active = torch.ones(2, 6, dtype=torch.bool)
    chosen = select_heads(scores, active, 12, scope="uniform", min_active_heads_per_layer=3, unit="group", group_size=2)
    assert len(chosen) == 4  # at most one group of every layer: each keeps 4 >= 3 heads
    assert uniform_shape(torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool), 2) is None  # groups differ
    assert uniform_shape(torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool), 1) is None  # layers differ
    assert uniform_shape(torch.zeros(2, 4, dtype=torch.bool), 2) == (0, 0)


def test_gradient_scores_batch_per_example_and_per_layer_normalised_importance():
    from sentinel_lightning.strategies import STRATEGIES

    metrics = {
        "grad_norm": torch.tensor([[0.1, 0.2], [0.3, 0.4]]),
        "example_importance": torch.tensor([[0.5, 0.1], [3.0, 4.0]]),
    }
    example = metrics["example_importance"]
    assert torch.equal(STRATEGIES["gradient"](0)(metrics), -metrics["grad_norm"])
    assert torch.equal(STRATEGIES["gradient_per_example"](0)(metrics), -example)
    normalised = STRATEGIES["gradient_layer_norm"](0)(metrics)
    assert torch.allclose(normalised, -example / example.norm(dim=1, keepdim=True))


def test_rank_within_layer_spreads_pruning_over_layers_and_keeps_nan():
    from sentinel_lightning.strategies import rank_within_layer

    values = torch.tensor([[0.9, 0.8, 0.1], [0.05, 0.04, 0.03], [float("nan"), 0.5, 0.6]])
    ranks = rank_within_layer(values)
    assert torch.isnan(ranks[2, 0]) and torch.isfinite(ranks[:2]).all()
    assert ranks[0].argsort().tolist() == [2, 1, 0] and ranks[1].argsort().tolist() == [2, 1, 0]
    # Highest rank of every layer first, whatever the layers' scales; equal ranks ordered by the values.
    heads = select_heads(ranks, torch.ones(3, 3, dtype=torch.bool), 3, min_active_heads_per_layer=0)
    assert heads == [(0, 0), (2, 2), (1, 0)]


def test_attention_sink_prunes_the_heads_that_park_on_the_first_token_in_every_layer():
    from sentinel_lightning.strategies import METRIC_STRATEGIES, STRATEGIES

    sink = torch.tensor([[0.9, 0.1, 0.2, 0.3], [0.2, 0.3, 0.25, 0.21]])  # layer 1's sinks are all weak
    score = STRATEGIES["attention_sink"](0)({"sink_mass": sink})
    heads = select_heads(score, torch.ones(2, 4, dtype=torch.bool), 2)
    assert sorted(heads) == [(0, 0), (1, 1)]
    assert "random" not in METRIC_STRATEGIES and {"attention_sink", "entropy", "gradient"} <= set(METRIC_STRATEGIES)
