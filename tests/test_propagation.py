"""The selection rule, utility update and schedule on hand-made numbers."""

import math

import pytest
import torch

from dcp_kernels import DCPConv2d, DecaySchedule, Propagation
from dcp_kernels.propagation import keep_count, select_channels, update_utilities


def test_keep_count_rounds_half_up():
    assert keep_count(10, 0.5) == 5
    assert keep_count(10, 0.25) == 7   # round(2.5) = 3 pruned
    assert keep_count(10, 0.0) == 10
    assert keep_count(3, 0.5) == 1     # round(1.5) = 2 pruned
    for bad in (-0.1, 1.0, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="prune_ratio"):
            keep_count(10, bad)


def test_selects_exactly_k_highest_globally():
    u = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7])
    mask = select_channels(u, [3, 4], keep=4, min_channels=1)
    assert mask.tolist() == [False, True, True, False, True, False, True]


def test_ties_go_to_lower_global_index():
    u = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    mask = select_channels(u, [2, 4], keep=3, min_channels=0)
    assert mask.tolist() == [True, True, True, False, False, False]
    u = torch.tensor([0.0, 2.0, 1.0, 2.0, 1.0])
    assert select_channels(u, [5], keep=3, min_channels=0).tolist() == [False, True, True, True, False]


def test_floors_then_global():
    # Layer 0 would get nothing by rank; its floor of 2 keeps its two best channels.
    u = torch.tensor([0.01, 0.03, 0.02, 5.0, 4.0, 3.0, 2.0])
    mask = select_channels(u, [3, 4], keep=4, min_channels=2)
    assert mask.tolist() == [False, True, True, True, True, False, False]
    # Per-layer floors, capped at the layer size.
    mask = select_channels(u, [3, 4], keep=5, min_channels=[5, 1])
    assert mask.tolist() == [True, True, True, True, True, False, False]
    with pytest.raises(ValueError, match="minimums"):
        select_channels(u, [3, 4], keep=1, min_channels=1)


def test_nan_utilities_rank_last():
    u = torch.tensor([float("nan"), 0.1, 0.2])
    assert select_channels(u, [3], keep=2, min_channels=0).tolist() == [False, True, True]


def _random_selections(seed, trials, layers, max_size, max_utility, floors):
    """(utilities, sizes, keep, floor) cases with many ties, a floor in ``floors``, any feasible keep."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(trials):
        sizes = torch.randint(1, max_size + 1, (layers,), generator=g).tolist()
        total = sum(sizes)
        u = torch.randint(0, max_utility, (total,), generator=g).float()
        floor = int(torch.randint(floors[0], floors[1] + 1, (1,), generator=g))
        keep = int(torch.randint(sum(min(floor, s) for s in sizes), total + 1, (1,), generator=g))
        yield u, sizes, keep, floor


def test_selection_matches_a_brute_force_rule_on_random_vectors():
    for trial, (u, sizes, keep, floor) in enumerate(_random_selections(3, 50, 4, 8, 4, (0, 2))):
        total = sum(sizes)
        got = select_channels(u, sizes, keep, floor)
        # Brute force: per layer take the best `floor` (ties lower index), then fill globally.
        chosen, start = set(), 0
        for s in sizes:
            ranked = sorted(range(start, start + s), key=lambda i: (-float(u[i]), i))
            chosen.update(ranked[: min(floor, s)])
            start += s
        rest = sorted((i for i in range(total) if i not in chosen), key=lambda i: (-float(u[i]), i))
        chosen.update(rest[: keep - len(chosen)])
        assert got.tolist() == [i in chosen for i in range(total)], trial
        assert int(got.sum()) == keep


def test_update_utilities_normalises_and_touches_only_selected():
    u = torch.tensor([1.0, 1.0, 1.0, 1.0])
    update_utilities(u, torch.tensor([2.0, 4.0]), torch.tensor([1, 3]), decay=0.5)
    assert u.tolist() == [1.0, 1.0, 1.0, 1.5]
    # max(v) == 0: v = 0, never NaN.
    update_utilities(u, torch.zeros(4), None, decay=0.5)
    assert u.tolist() == [0.5, 0.5, 0.5, 0.75]


def test_decay_schedule():
    s = DecaySchedule(start=0.6, step=0.1, milestones=(100, 150), final=190)
    assert [s.at(e) for e in (0, 99, 100, 149, 150, 189, 190, 199)] == pytest.approx(
        [0.6, 0.6, 0.7, 0.7, 0.8, 0.8, 1.0, 1.0]
    )
    assert DecaySchedule(start=0.95, step=0.1, milestones=(1,)).at(1) == 1.0
    with pytest.raises(ValueError):
        DecaySchedule(start=1.5)


def _layers(*sizes):
    return {f"l{i}": DCPConv2d(2, s, 3, padding=1) for i, s in enumerate(sizes)}


def test_controller_exploration_then_selection():
    layers = _layers(4, 6)
    prop = Propagation(layers, 0.5, explore_epochs=1)
    layers["l0"].utility.copy_(torch.tensor([4.0, 3.0, 2.0, 1.0]))
    layers["l1"].utility.copy_(torch.arange(6.0) / 10)
    prop.step()
    assert prop.kept() == {"l0": 4, "l1": 6}  # exploring: all selected
    prop.epoch_end()
    prop.step()
    assert prop.kept() == {"l0": 4, "l1": 1}  # keep 5: the 4 of l0, then l1's best (its floor)
    assert layers["l1"].selected.tolist() == [False] * 5 + [True]


def test_coupled_layers_share_one_selection_by_mean_utility():
    layers = _layers(4, 4, 3)
    prop = Propagation(layers, 0.5, explore_epochs=0, groups=[["l0", "l1"], ["l2"]])
    assert prop.total_channels == 7 and prop.keep == 3  # coupled channels count once
    layers["l0"].utility.copy_(torch.tensor([1.0, 0.0, 0.0, 0.2]))
    layers["l1"].utility.copy_(torch.tensor([0.0, 0.9, 0.0, 0.2]))
    layers["l2"].utility.copy_(torch.tensor([0.6, 0.48, 0.1]))
    assert prop.utility_vector().tolist() == pytest.approx([0.5, 0.45, 0.0, 0.2, 0.6, 0.48, 0.1])
    prop.step()
    # The group ranks by the means (0.5, 0.45, 0.0, 0.2): l2's 0.6 and 0.48 and the group's 0.5 win
    # (a sum, 0.9 for channel 1, would have taken l2's second slot).
    assert layers["l0"].selected.tolist() == layers["l1"].selected.tolist() == [True, False, False, False]
    assert layers["l2"].selected.tolist() == [True, True, False]


def test_group_rule_matches_a_brute_force_oracle():
    """The controller's selection with coupled groups equals a brute-force rule written from
    docs/algorithm.md: a group channel's score is the mean of its members' utilities; the k best
    scores win (each group first keeps its best one), ties to the lower channel index."""
    g = torch.Generator().manual_seed(3)
    for trial in range(30):
        sizes = [int(s) for s in torch.randint(2, 7, (5,), generator=g)]
        sizes[1] = sizes[2] = sizes[3]  # l1..l3 share a width: they form one group
        layers = {f"l{i}": DCPConv2d(2, s, 3) for i, s in enumerate(sizes)}
        groups = [["l0"], ["l1", "l2", "l3"], ["l4"]]
        prop = Propagation(layers, 0.4, explore_epochs=0, groups=groups)
        for layer in layers.values():
            layer.utility.copy_(torch.randint(0, 5, (layer.out_channels,), generator=g).float() / 4)
        prop.step()
        scores = [(layers["l0"].utility[c].item(), "l0", c) for c in range(sizes[0])]
        scores += [(sum(layers[n].utility[c].item() for n in groups[1]) / 3, "g", c) for c in range(sizes[1])]
        scores += [(layers["l4"].utility[c].item(), "l4", c) for c in range(sizes[4])]
        chosen = set()
        for name in ("l0", "g", "l4"):  # floors: each group's best channel (lowest index on ties)
            own = [(s, c) for s, n, c in scores if n == name]
            chosen.add((name, max(own, key=lambda sc: (sc[0], -sc[1]))[1]))
        order = sorted(range(len(scores)), key=lambda i: (-scores[i][0], i))
        for i in order:
            if len(chosen) >= prop.keep:
                break
            chosen.add((scores[i][1], scores[i][2]))
        for name, layer_names in (("l0", ["l0"]), ("g", groups[1]), ("l4", ["l4"])):
            want = [(name, c) in chosen for c in range(layers[layer_names[0]].out_channels)]
            for n in layer_names:
                assert layers[n].selected.tolist() == want, (trial, n)


def test_per_layer_ratio_is_kept_within_its_group():
    layers = _layers(4, 4, 6)
    prop = Propagation(layers, 0.5, explore_epochs=0, groups=[["l0", "l1"], ["l2"]],
                       layer_prune_ratios={"l1": 0.25})
    assert prop.keep == 3 + 3  # the group keeps 4 - round(1) = 3; l2 keeps 6 - 3 = 3 on its own
    layers["l2"].utility.copy_(torch.full((6,), 10.0))  # would win every global slot
    prop.step()
    assert prop.kept() == {"l0": 3, "l1": 3, "l2": 3}
    with pytest.raises(ValueError, match="different prune ratios"):
        Propagation(_layers(4, 4), 0.5, groups=[["l0", "l1"]], layer_prune_ratios={"l0": 0.25, "l1": 0.5})
    with pytest.raises(ValueError, match="different widths"):
        Propagation(_layers(4, 3), 0.5, groups=[["l0", "l1"]])
    with pytest.raises(ValueError, match="in no group"):
        Propagation(_layers(4, 4), 0.5, groups=[["l0"]])


def test_controller_state_dict_round_trip():
    prop = Propagation(_layers(4, 4), 0.25, explore_epochs=2, decay=DecaySchedule(0.6, 0.1, (1,), 3))
    prop.epoch_end()
    prop.step()
    other = Propagation(_layers(4, 4), 0.5)
    other.load_state_dict(prop.state_dict())
    assert other.state_dict() == prop.state_dict()
    assert other.decay == pytest.approx(0.7) and other.layers[0].decay == pytest.approx(0.7)
    with pytest.raises(ValueError, match="other layers"):
        Propagation({"x": DCPConv2d(2, 4, 3)}).load_state_dict(prop.state_dict())


def test_controller_rejects_bad_configuration():
    with pytest.raises(ValueError, match="prune_ratio"):
        Propagation(_layers(4), 1.0)
    with pytest.raises(ValueError, match="minimums"):
        Propagation(_layers(4, 4), 0.9, min_channels=2)
    with pytest.raises(ValueError, match="unknown layers"):
        Propagation(_layers(4), 0.5, min_channels={"nope": 2})
    with pytest.raises(ValueError, match="explore_epochs"):
        Propagation(_layers(4), 0.5, explore_epochs=-1)
    with pytest.raises(ValueError, match="at least one"):
        Propagation({}, 0.5)


def test_selection_is_cheap_for_a_large_network():
    """Not a timing assertion: checks selection is vectorised (no per-channel Python work)
    by counting the torch ops it issues, which must not grow with the channel count."""
    from torch.profiler import profile

    def count_ops(width):
        layers = {f"l{i}": DCPConv2d(2, width, 1) for i in range(13)}
        prop = Propagation(layers, 0.5, explore_epochs=0)
        for layer in layers.values():
            layer.utility.uniform_()
        with profile() as p:
            prop.select()
        return len(p.events())

    assert count_ops(512) == count_ops(64)


def _brute_force_selection(u, sizes, keep, floor, round_to, blocks=None):
    """The documented rule written the slow, obvious way (docs/algorithm.md, "round_to" and
    "Grouped convolutions")."""
    blocks = blocks or [1] * len(sizes)
    total = sum(sizes)
    chosen, start, ranked_per_layer = set(), 0, []
    for s in sizes:
        ranked = sorted(range(start, start + s), key=lambda i: (-float(u[i]), i))
        ranked_per_layer.append(ranked)
        chosen.update(ranked[: min(floor, s)])
        start += s
    rest = sorted((i for i in range(total) if i not in chosen), key=lambda i: (-float(u[i]), i))
    chosen.update(rest[: keep - len(chosen)])
    if round_to == 1 and max(blocks) == 1:
        return chosen
    rounded = set()
    for s, ranked, b in zip(sizes, ranked_per_layer, blocks):
        unit = math.lcm(round_to, b)
        count = sum(1 for i in ranked if i in chosen)
        nearest = unit * int(count / unit + 0.5)                  # nearest multiple, halves up
        lowest = unit * -(-max(floor, 1) // unit)                 # smallest multiple holding the floor
        width = min(s, max(nearest, lowest))                      # at most the whole layer
        first = min(ranked)
        for j in range(b):  # the same number, the best ones, in every block
            block = [i for i in ranked if first + j * (s // b) <= i < first + (j + 1) * (s // b)]
            rounded.update(block[: width // b])
    return rounded


@pytest.mark.parametrize("round_to", [1, 2, 4, 8])
def test_round_to_matches_a_brute_force_rule(round_to):
    for trial, (u, sizes, keep, floor) in enumerate(_random_selections(round_to, 60, 5, 39, 6, (1, 3))):
        total = sum(sizes)
        got = select_channels(u, sizes, keep, floor, round_to=round_to)
        expected = _brute_force_selection(u, sizes, keep, floor, round_to)
        assert got.tolist() == [i in expected for i in range(total)], (trial, sizes, keep, floor)
        for part, s in zip(torch.split(got, sizes), sizes):
            k = int(part.sum())
            assert k == s or k % round_to == 0  # every width a multiple, or the whole layer


@pytest.mark.parametrize("round_to", [1, 4])
def test_blocks_match_a_brute_force_rule(round_to):
    g = torch.Generator().manual_seed(11 + round_to)
    for trial in range(60):
        blocks = [int(b) for b in torch.randint(1, 5, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g)]
        sizes = [b * int(torch.randint(1, 7, (1,), generator=g)) for b in blocks]
        total = sum(sizes)
        u = torch.randint(0, 6, (total,), generator=g).float()  # small range: many ties
        floor = int(torch.randint(1, 3, (1,), generator=g))
        keep = int(torch.randint(sum(min(floor, s) for s in sizes), total + 1, (1,), generator=g))
        got = select_channels(u, sizes, keep, floor, round_to=round_to, blocks=blocks)
        expected = _brute_force_selection(u, sizes, keep, floor, round_to, blocks)
        assert got.tolist() == [i in expected for i in range(total)], (trial, sizes, blocks, keep, floor)
        for part, s, b in zip(torch.split(got, sizes), sizes, blocks):
            per_block = part.view(b, -1).sum(1)
            assert bool((per_block == per_block[0]).all()) and int(per_block[0]) >= 1, (trial, per_block)


def test_blocks_examples():
    # One layer of 8 channels in 2 blocks of 4: the exact rule keeps the 3 best overall (all in the
    # first block); rounded to a multiple of 2 (nearest: 4), each block then keeps its 2 best.
    u = torch.tensor([9.0, 8, 7, 1, 5, 6, 0, 0])
    assert select_channels(u, [8], keep=3).tolist() == [True, True, True] + [False] * 5
    got = select_channels(u, [8], keep=3, blocks=[2])
    assert got.tolist() == [True, True, False, False, True, True, False, False]
    with pytest.raises(ValueError, match="cannot form 3 equal blocks"):
        select_channels(u, [8], keep=3, blocks=[3])


def test_round_to_examples():
    # Two layers of 8: the exact rule keeps 5 and 3 of them (keep=8); rounded to 4: 4 and 4.
    u = torch.tensor([9.0, 8, 7, 6, 5, 1, 1, 1] + [4.5, 4, 3.5, 0, 0, 0, 0, 0])
    exact = select_channels(u, [8, 8], keep=8)
    assert [int(p.sum()) for p in exact.split(8)] == [5, 3]
    rounded = select_channels(u, [8, 8], keep=8, round_to=4)
    assert [int(p.sum()) for p in rounded.split(8)] == [4, 4]  # 5 -> 4, 3 -> 4 (nearest)
    assert rounded.tolist() == [True] * 4 + [False] * 4 + [True] * 4 + [False] * 4
    # A layer whose exact count rounds to 0 keeps round_to channels; a narrow layer keeps all.
    u = torch.tensor([9.0, 8, 7, 6, 5, 4, 3, 2, 0.1, 0.2, 0.3])
    rounded = select_channels(u, [8, 3], keep=5, min_channels=1, round_to=4)
    assert [int(p.sum()) for p in rounded.split([8, 3])] == [4, 3]


def test_controller_round_to_keeps_multiples_and_survives_state_dict():
    layers = {f"l{i}": DCPConv2d(4, c, 3) for i, c in enumerate([16, 24, 32])}
    prop = Propagation(layers, 0.5, explore_epochs=0, round_to=8)
    for layer in layers.values():
        layer.utility.copy_(torch.rand(layer.out_channels))
    prop.select()
    assert all(k % 8 == 0 for k in prop.kept().values())
    state = prop.state_dict()
    assert state["round_to"] == 8
    other = Propagation(layers, 0.5, explore_epochs=0)
    other.load_state_dict(state)
    assert other.round_to == 8
    for bad in (0, -8, 2.0, True):
        with pytest.raises(ValueError, match="round_to"):
            Propagation(layers, 0.5, round_to=bad)


def test_gradient_accumulation_selects_once_per_optimizer_step():
    import torch.nn.functional as F

    from dcp_kernels import convert
    from dcp_kernels.models import vgg

    torch.manual_seed(0)
    model = vgg([8, "M", 12, 12], num_classes=4)
    prop = convert(model, 0.5, explore_epochs=0)
    prop.auto_select = False
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(torch.cat([l.selected for l in prop.layers]).clone()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    steps_before = prop.steps
    for _ in range(3):  # optimizer steps
        prop.step()
        before = [l.utility.clone() for l in prop.layers]
        for _ in range(2):  # micro-batches
            x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
            (F.cross_entropy(model(x), y) / 2).backward()
        assert any(not torch.equal(b, l.utility) for b, l in zip(before, prop.layers))  # backward measured
        opt.step()
        opt.zero_grad()
    assert prop.steps - steps_before == 3
    for first, second in zip(seen[0::2], seen[1::2]):
        assert torch.equal(first, second)  # one selection for both micro-batches of a step
    assert not torch.equal(seen[2], seen[4]) or not torch.equal(seen[0], seen[2])  # and it does move
