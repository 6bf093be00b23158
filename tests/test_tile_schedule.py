"""The tile schedule both pair_stats backends follow (csrc/ops/pair_stats_host.h).

``torch.ops.fastiml.pair_stats_tile_schedule`` returns the schedule the kernels walk; these
tests check it against the rules computed independently here from the group codes: no pair
that shares a group is ever left out (results), pairs of tiles with disjoint sorted groups are
(work), self mode's symmetric schedule keeps the upper triangle, and the column-range splits
cover each row tile's list exactly once, in order, in near-equal runs.
"""
import math

import pytest
import torch

import fastiml.ops  # noqa: F401  (loads the compiled module)


def schedule(own, other, tile, upper_only=False, min_items=1):
    begin, others, owner = torch.ops.fastiml.pair_stats_tile_schedule(
        own, other, tile, upper_only, min_items)
    own_tiles = math.ceil(len(own) / tile)
    items = len(begin) - 1
    splits = items // own_tiles if own_tiles else 1
    assert own_tiles == 0 or items == own_tiles * splits
    lists = {}  # (own tile, split) -> other tiles
    for w in range(items):
        lists[(w // splits, w % splits)] = others[begin[w]:begin[w + 1]].tolist()
        assert (owner[begin[w]:begin[w + 1]] == w // splits).all()
    return splits, lists


def tile_groups(groups, tile):
    """The set of counted (non-negative) group codes of each tile."""
    return [set(g for g in groups[i:i + tile].tolist() if g >= 0)
            for i in range(0, len(groups), tile)]


def full_lists(lists, splits):
    own_tiles = len(lists) // splits if splits else 0
    return {r: sum((lists[(r, s)] for s in range(splits)), []) for r in range(own_tiles)}


def sorted_codes(sizes):
    return torch.cat([torch.full((n,), g, dtype=torch.long) for g, n in enumerate(sizes)])


@pytest.mark.parametrize("seed", range(4))
def test_unsorted_groups_never_lose_a_pair(seed):
    g = torch.Generator().manual_seed(seed)
    own = torch.randint(-1, 6, (300,), generator=g)
    other = torch.randint(-1, 6, (410,), generator=g)
    splits, lists = schedule(own, other, 32)
    assert splits == 1
    scheduled = full_lists(lists, splits)
    rows, cols = tile_groups(own, 32), tile_groups(other, 32)
    for r, row_set in enumerate(rows):
        need = [c for c, col_set in enumerate(cols) if row_set & col_set]
        assert set(need) <= set(scheduled[r])
        assert scheduled[r] == sorted(scheduled[r])  # walked in column order


def test_sorted_groups_schedule_the_tiles_whose_ranges_meet():
    """Image-major groups (MPC): the schedule is the block diagonal, not all tile pairs.

    Tiles are compared by their [min, max] group ranges, so a column tile spanning groups 0 and
    2 still meets a row tile of group 1 (group 1 has no column here): a few extra pairs, never a
    missing one."""
    own = sorted_codes([100, 37, 250, 64, 1, 90])
    other = sorted_codes([40, 0, 300, 64, 20, 130])
    splits, lists = schedule(own, other, 16)
    scheduled = full_lists(lists, splits)
    rows, cols = tile_groups(own, 16), tile_groups(other, 16)
    meets = lambda a, b: bool(a) and bool(b) and min(a) <= max(b) and min(b) <= max(a)  # noqa
    for r, row_set in enumerate(rows):
        assert scheduled[r] == [c for c, col_set in enumerate(cols) if meets(row_set, col_set)]
        assert {c for c, col_set in enumerate(cols) if row_set & col_set} <= set(scheduled[r])
    pairs = sum(len(v) for v in scheduled.values())
    assert pairs < len(rows) * len(cols) / 2


def test_batch_of_images_costs_linear_work():
    """B images of equal size: the pairs grow like B, not B^2."""
    def pairs(batch):
        codes = sorted_codes([256] * batch)
        _, lists = schedule(codes, codes, 64)
        return sum(len(v) for v in lists.values())
    assert pairs(4) == 4 * 16 and pairs(16) == 16 * 16


def test_upper_only_keeps_the_upper_triangle():
    codes = sorted_codes([70, 200, 33])
    codes[torch.arange(0, len(codes), 7)] = -1  # ignored entries do not widen a range
    splits, lists = schedule(codes, codes, 32, upper_only=True)
    full = full_lists(schedule(codes, codes, 32)[1], 1)
    upper = full_lists(lists, splits)
    for r in full:
        assert upper[r] == [c for c in full[r] if c >= r]


def test_all_ignored_rows_still_get_items():
    own = torch.full((130,), -1, dtype=torch.long)
    other = torch.zeros(50, dtype=torch.long)
    splits, lists = schedule(own, other, 64, min_items=8)
    assert len(lists) == 3 * splits and all(v == [] for v in lists.values())


@pytest.mark.parametrize("own_len,other_len,tile,min_items", [
    (64, 2048, 64, 264),      # one row tile: split into as many runs as there are tiles
    (2048, 2048, 64, 264),    # 32 row tiles < 264: 9 splits of 32 column tiles
    (300, 1000, 64, 16),      # 5 row tiles: 4 splits of 16 column tiles
    (1000, 1000, 64, 8),      # enough row tiles: no split
    (1, 1, 64, 264),          # N = M = 1
])
def test_splits_cover_each_list_once_in_order(own_len, other_len, tile, min_items):
    own, other = torch.zeros(own_len, dtype=torch.long), torch.zeros(other_len, dtype=torch.long)
    splits, lists = schedule(own, other, tile, min_items=min_items)
    own_tiles, other_tiles = math.ceil(own_len / tile), math.ceil(other_len / tile)
    want = 1 if own_tiles >= min_items else min(math.ceil(min_items / own_tiles), other_tiles)
    assert splits == want
    for r in range(own_tiles):
        runs = [lists[(r, s)] for s in range(splits)]
        assert sum(runs, []) == list(range(other_tiles))
        lengths = [len(run) for run in runs]
        assert max(lengths) - min(lengths) <= 1


def test_splits_depend_on_tile_counts_only():
    """The split count comes from the tile counts alone (the CUDA grid size must be known
    without reading the groups back from the GPU): with image-major groups each row tile meets
    few column tiles, so most runs are empty, and each list is still covered once, in order,
    in runs that differ by at most one tile."""
    own = sorted_codes([100, 37, 250, 64, 1, 90])
    other = sorted_codes([40, 0, 300, 64, 20, 130])
    splits, lists = schedule(own, other, 16, min_items=2000)
    own_tiles, other_tiles = math.ceil(len(own) / 16), math.ceil(len(other) / 16)
    assert splits == min(math.ceil(2000 / own_tiles), other_tiles)
    want = full_lists(schedule(own, other, 16)[1], 1)
    assert max(len(v) for v in want.values()) < splits  # lists shorter than the split count
    for r in range(own_tiles):
        runs = [lists[(r, s)] for s in range(splits)]
        assert sum(runs, []) == want[r]
        lengths = [len(run) for run in runs]
        assert max(lengths) - min(lengths) <= 1


def test_bad_input_is_named():
    with pytest.raises(RuntimeError, match="tile must be > 0"):
        torch.ops.fastiml.pair_stats_tile_schedule(torch.zeros(3, dtype=torch.long),
                                                   torch.zeros(3, dtype=torch.long), 0, False, 1)
    with pytest.raises(RuntimeError, match="integer"):
        torch.ops.fastiml.pair_stats_tile_schedule(torch.zeros(3), torch.zeros(3), 4, False, 1)


# ------------------------------------------------ the CUDA test hook FASTIML_CUDA_FORCE_TILES
# The op applies the hook to min_items as the CUDA kernels do (min_items_for_device), so these
# replays are the schedules the GPU runs under it.

HOOK = "FASTIML_CUDA_FORCE_TILES"
H100_ITEMS = 2 * 132  # min_items_for_device on a 132-SM H100 / H200


def selftest_shapes():
    """(N, M) of every pair_stats / pair_softplus mode of fastiml selftest (M = N in self
    mode), and the largest pytest size."""
    from fastiml import selftest
    modes = {**selftest.PAIR_MODES, **selftest.SWEEP_MODES, **selftest.TWO_GROUP_MODES}
    return [(n, n if m is None else m) for n, m, _, _ in modes.values()] + [(600, 600)]


def test_default_split_gives_single_tiles_at_selftest_sizes(monkeypatch):
    """Why the hook exists: at every selftest size the device rule (264 items on an H100)
    cuts each row tile's list into single tiles, so no block ever walks two."""
    monkeypatch.delenv(HOOK, raising=False)
    for n, m in selftest_shapes():
        splits, lists = schedule(torch.zeros(n, dtype=torch.long), torch.zeros(m, dtype=torch.long),
                                 64, min_items=H100_ITEMS)
        assert max(len(v) for v in lists.values()) == 1, (n, m, splits)


def test_multi_hook_gives_every_block_its_whole_list(monkeypatch):
    """FASTIML_CUDA_FORCE_TILES=multi: no split at the device's min_items, so each block walks
    all the column tiles its row tile meets -- >= 2 at every selftest size with M > 64."""
    monkeypatch.setenv(HOOK, "multi")
    for n, m in selftest_shapes():
        splits, lists = schedule(torch.zeros(n, dtype=torch.long), torch.zeros(m, dtype=torch.long),
                                 64, min_items=H100_ITEMS)
        assert splits == 1
        assert all(v == list(range(math.ceil(m / 64))) for v in lists.values()), (n, m)
        if m > 64:
            assert min(len(v) for v in lists.values()) >= 2


def test_multi_hook_keeps_the_group_filter(monkeypatch):
    """The hook changes the split, never which pairs run."""
    own = sorted_codes([100, 37, 250, 64, 1, 90])
    other = sorted_codes([40, 0, 300, 64, 20, 130])
    monkeypatch.delenv(HOOK, raising=False)
    default_splits, default_lists = schedule(own, other, 64, min_items=H100_ITEMS)
    assert default_splits > 1
    want = full_lists(default_lists, default_splits)
    monkeypatch.setenv(HOOK, "multi")
    splits, lists = schedule(own, other, 64, min_items=H100_ITEMS)
    assert splits == 1 and full_lists(lists, 1) == want


def test_single_hook_splits_every_list_into_single_tiles(monkeypatch):
    """FASTIML_CUDA_FORCE_TILES=single: every item holds at most one tile pair, even where the
    device rule would not split at all (here 32 row tiles against min_items 8)."""
    own, other = torch.zeros(2048, dtype=torch.long), torch.zeros(1000, dtype=torch.long)
    monkeypatch.delenv(HOOK, raising=False)
    assert schedule(own, other, 64, min_items=8)[0] == 1
    monkeypatch.setenv(HOOK, "single")
    splits, lists = schedule(own, other, 64, min_items=8)
    assert splits == math.ceil(1000 / 64)
    assert all(len(v) <= 1 for v in lists.values())
    assert full_lists(lists, splits) == {r: list(range(splits)) for r in range(32)}


def test_bad_hook_value_is_named(monkeypatch):
    monkeypatch.setenv(HOOK, "yes")
    with pytest.raises(RuntimeError, match="FASTIML_CUDA_FORCE_TILES must be 'multi', 'single'"):
        schedule(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), 4)
    monkeypatch.setenv(HOOK, "")  # empty: the device rule
    assert schedule(torch.zeros(300, dtype=torch.long), torch.zeros(300, dtype=torch.long), 64,
                    min_items=H100_ITEMS)[0] == 5
