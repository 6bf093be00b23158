"""The range scale of the CUDA dk pass's 16-bit G tiles (TileRangeScale in csrc/ops/pair_stats.h).

On tensor cores the backward rounds G to float16 before multiplying. The dk pass sums G^T Q
over row tiles in one float32 accumulator; each row tile gets its own power-of-two scale and the
accumulator is rescaled between tiles, with a cap that keeps the sums already accumulated finite.
``torch.ops.fastiml.pair_stats_range_exponents`` returns the exponents the kernel uses; these
tests check their rules and replay the kernel's arithmetic (scale, round to float16, multiply
with float32 sums, rescale) on the CPU against a float64 product.
"""
import math

import pytest
import torch

import fastiml.ops  # noqa: F401  (loads the compiled module)

ROWS = 64  # the CUDA kernel's row tile


def exponents(tile_max, x_max, rows=ROWS):
    return torch.ops.fastiml.pair_stats_range_exponents(
        torch.tensor(tile_max, dtype=torch.float32), float(x_max), rows).tolist()


def replay(g_tiles, x_tiles, exps):
    """dk = sum_t G_t^T X_t as the kernel computes it: G_t * 2^e_t rounded to float16, products
    summed in a float32 accumulator that is multiplied by 2^(e_t - e_{t-1}) before each tile."""
    acc = torch.zeros(g_tiles[0].shape[1], x_tiles[0].shape[1], dtype=torch.float32)
    previous = 0
    for g, x, e in zip(g_tiles, x_tiles, exps):
        acc = torch.ldexp(acc, torch.tensor(e - previous, dtype=torch.float32))
        assert torch.isfinite(acc).all(), "the accumulator left float32's range"
        g16 = (g.double() * 2.0 ** e).to(torch.float16)
        acc = (acc.double() + g16.double().T @ x.to(torch.float16).double()).float()
        previous = e
    return torch.ldexp(acc, torch.tensor(-previous, dtype=torch.float32)).double()


def test_each_tile_gets_its_own_range():
    tile_max = [1.0, 3e-9, 40000.0, 2.0 ** -14, 1e-20]
    exps = exponents(tile_max, x_max=1.0)
    for bound, e in zip(tile_max, exps):
        assert 2.0 ** 14 <= bound * 2.0 ** e < 2.0 ** 15  # 11 bits kept, no overflow


def test_tiles_with_nothing_to_scale_keep_the_exponent():
    exps = exponents([1e-3, 0.0, float("inf"), float("nan"), 1e-3], x_max=1.0)
    assert exps[1:4] == [exps[0]] * 3 and exps[4] == exps[0]


def test_the_cap_keeps_earlier_sums_finite():
    # Huge gradients, then tiny ones: the tiny tile would want 2^114, which would push the sums
    # of the first tile (~64 * 1e30 * 1e4 in true units) past float32's range.
    own = 15 - math.frexp(1e-30)[1]  # 1e-30 = f 2^-99, f in [0.5, 1): 114
    exps = exponents([1e30, 1e-30], x_max=1e4)
    bound = ROWS * 1e30 * 1e4
    assert exps[1] < own
    assert bound * 2.0 ** exps[1] <= 2.0 ** 120
    # Without huge sums before it the same tile gets its full range.
    assert exponents([1e-30], x_max=1e4)[0] == own == 114


def test_rows_and_x_max_enter_the_bound():
    few = exponents([1e30, 1e-30], x_max=1e4, rows=1)[1]
    many = exponents([1e30, 1e-30], x_max=1e4, rows=1024)[1]
    assert many == few - 10
    with pytest.raises(RuntimeError, match="rows must be > 0"):
        exponents([1.0], x_max=1.0, rows=0)
    with pytest.raises(RuntimeError, match="tile_max must be a 1-D float32"):
        torch.ops.fastiml.pair_stats_range_exponents(torch.ones(2, dtype=torch.float64), 1.0, 64)


def test_replay_keeps_a_small_gradient_group_that_one_global_scale_flushes():
    # Two images (groups) in one column tile: rows 0-63 (large upstream gradients) only meet
    # columns 0-31, rows 64-127 (upstream gradients 1e-12) only columns 32-63. Their columns'
    # gradients come from the small tile alone.
    gen = torch.Generator().manual_seed(0)
    g = torch.zeros(2 * ROWS, 64, dtype=torch.float64)
    g[:ROWS, :32] = torch.rand(ROWS, 32, generator=gen, dtype=torch.float64) / 32
    g[ROWS:, 32:] = 1e-12 * torch.rand(ROWS, 32, generator=gen, dtype=torch.float64) / 32
    x = torch.randn(2 * ROWS, 48, generator=gen, dtype=torch.float64).to(torch.float16)
    g_tiles, x_tiles = [g[:ROWS], g[ROWS:]], [x[:ROWS], x[ROWS:]]
    truth = g.T @ x.double()
    tile_bounds = [float(t.abs().max()) for t in g_tiles]
    per_tile = replay(g_tiles, x_tiles, exponents(tile_bounds, float(x.abs().max())))
    one_scale = replay(g_tiles, x_tiles, [15 - math.frexp(max(tile_bounds))[1]] * 2)
    # Errors against the sum of magnitudes (64 terms of mixed sign can cancel): float16 G keeps
    # 11 bits, so every column stays within a few 2^-11.
    magnitude = g.abs().T @ x.double().abs()

    def worst(dk, columns):
        return float(((dk - truth).abs() / magnitude)[columns].max())

    assert worst(per_tile, slice(0, 32)) < 2e-3 and worst(per_tile, slice(32, 64)) < 2e-3
    # One scale for both tiles (the previous scheme) puts the small tile's entries at ~3e-8,
    # below float16's smallest subnormal spacing (6e-8): their columns lose almost everything.
    assert worst(one_scale, slice(32, 64)) > 0.1


def test_replay_through_the_cap_matches_float64():
    gen = torch.Generator().manual_seed(1)
    g_big = 1e30 * torch.rand(ROWS, 16, generator=gen, dtype=torch.float64)
    g_small = 1e-30 * torch.rand(ROWS, 16, generator=gen, dtype=torch.float64)
    x = (1e4 * torch.rand(2 * ROWS, 8, generator=gen, dtype=torch.float64)).to(torch.float16)
    exps = exponents([float(g_big.max()), float(g_small.max())], float(x.abs().max()))
    dk = replay([g_big, g_small], [x[:ROWS], x[ROWS:]], exps)
    truth = g_big.T @ x[:ROWS].double() + g_small.T @ x[ROWS:].double()
    assert torch.isfinite(dk).all()
    assert float(((dk - truth).abs() / truth).max()) < 2e-3
    # The uncapped exponent (the small tile's own range) overflows the accumulator.
    with pytest.raises(AssertionError, match="left float32's range"):
        replay([g_big, g_small], [x[:ROWS], x[ROWS:]], [exps[0], 15 - math.frexp(1e-30)[1]])
