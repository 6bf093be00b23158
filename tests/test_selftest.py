"""``fastiml selftest`` (fastiml/selftest.py): it passes on a correct build, and it fails -- or
skips with a reason, never crashes -- when it should.

The CPU run is what every machine can check; the CUDA run is the same comparisons on a GPU and is
skipped where none exists (there, the selftest is the users' first command).
"""
import math

import pytest
import torch

from conftest import _CUDA_SKIP
from fastiml import ops, selftest


def _assert_all_pass(rows):
    assert rows, "the selftest produced no rows"
    bad = [(r["op"], r["device"], r["dtype"], r["status"], r["reason"]) for r in rows
           if r["status"] != "PASS"]
    assert not bad, f"selftest rows that did not pass: {bad}"


def test_selftest_cpu_passes(capsys):
    rows = selftest.run(devices=["cpu"], verbose=True)
    _assert_all_pass(rows)
    ops_seen = {r["op"].split("/")[0] for r in rows}
    assert ops_seen == {"pair_stats", "pair_softplus", "contour_mine", "contour_band",
                        "pivot_consistency"}
    assert {r["op"] for r in rows if r["op"].startswith("pair_stats/")} == {
        f"pair_stats/{m}" for m in selftest.PAIR_MODES}
    assert {r["dtype"] for r in rows if r["op"] == "pivot_consistency"} == {
        "float32", "float16", "bfloat16"}
    for r in rows:  # every row says what it compared and how closely
        assert r["checks"] and all(math.isfinite(c["error"]) for c in r["checks"])
    table = capsys.readouterr().out
    assert "max error" in table and "tolerance" in table and "PASS" in table


@pytest.mark.skipif(_CUDA_SKIP is not None, reason=_CUDA_SKIP or "")
def test_selftest_cuda_passes():
    _assert_all_pass(selftest.run(devices=["cuda"], verbose=True))


# --------------------------------------------------------------- it must catch wrong kernels

class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `factor` (a kernel with a wrong backward)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def _subtle(dtype):
    """How wrong a wrong kernel is: 1% in float32, 10% in the half dtypes, whose tolerances
    (twice plain PyTorch's own error in that dtype) are wider."""
    return 0.01 if dtype == torch.float32 else 0.1


def _tau_off(q, k, *args, **kw):
    return ops.pair_stats(q, k, *args, **dict(kw, tau=kw["tau"] * (1 + _subtle(q.dtype))))


def _grad_off(q, k, *args, **kw):
    return ops.pair_stats(_ScaleGrad.apply(q, 1 + _subtle(q.dtype)), k, *args, **kw)


def _self_kept(q, k, *args, **kw):
    return ops.pair_stats(q, k, *args, **dict(kw, exclude_self=False))


def _counts_off(q, k, *args, **kw):
    lse, pos_mean, pos_count = ops.pair_stats(q, k, *args, **kw)
    return lse, pos_mean, pos_count + (pos_count % 7 == 0).long()


def _groups_ignored(q, k, q_label, k_label, q_group, k_group, **kw):
    return ops.pair_stats(q, k, q_label, k_label, None, None, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode, wrong", [("general", _tau_off), ("negatives", _grad_off),
                                         ("self", _self_kept), ("ignore", _counts_off),
                                         ("groups", _groups_ignored)])
def test_selftest_catches_a_wrong_pair_stats(mode, wrong, dtype):
    row = selftest.pair_stats_case("cpu", dtype, mode, impl=wrong)
    assert row["status"] == "FAIL", row
    right = selftest.pair_stats_case("cpu", dtype, mode, impl=ops.pair_stats)
    assert right["status"] == "PASS", right


def test_selftest_catches_wrong_contour_and_pivot():
    def mine_off(mask, patch, **kw):  # contour cells called tampered
        frac, klass = ops.contour_mine(mask, patch, **kw)
        return frac, torch.where(klass == 2, torch.ones_like(klass), klass)

    def band_off(mask, radius, **kw):  # radius off by one
        return ops.contour_band(mask, radius + 1, **kw)

    def pivot_off(a, b, klass, patch, **kw):  # padding cells weighted like the others
        return ops.pivot_consistency(a, b, torch.where(klass < 0, 0, klass).to(torch.int8),
                                     patch, **kw)

    assert selftest.contour_mine_case("cpu", torch.uint8, impl=mine_off)["status"] == "FAIL"
    assert selftest.contour_band_case("cpu", torch.bool, impl=band_off)["status"] == "FAIL"
    assert selftest.pivot_case("cpu", torch.float16, impl=pivot_off)["status"] == "FAIL"


def test_a_crashing_kernel_is_a_failure_not_a_crash():
    def boom(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    row = selftest.pair_stats_case("cpu", torch.float32, "general", impl=boom)
    assert row["status"] == "FAIL" and "illegal memory access" in row["reason"]


def test_missing_kernels_are_skipped_with_the_reason(monkeypatch):
    monkeypatch.setattr(selftest, "_has_kernel",
                        lambda op, device: f"fastiml::{op} has no CPU kernel in this build")
    rows = selftest.run(devices=["cpu"], verbose=False)
    assert rows and all(r["status"] == "SKIP" for r in rows)
    assert all("has no CPU kernel" in r["reason"] for r in rows)


def test_missing_python_api_is_skipped(monkeypatch):
    monkeypatch.setattr(selftest, "_api", lambda name: None)
    row = selftest.pivot_case("cpu", torch.float32)
    assert row["status"] == "SKIP" and "no pivot_consistency" in row["reason"]


def test_main_exit_status(monkeypatch, capsys):
    fail = dict(op="pair_stats/general", device="cpu", dtype="float32", shape="-", output="lse",
                error=1.0, tolerance=0.1, status="FAIL", reason="failed: lse", checks=[],
                seconds=0.0)
    passing = dict(fail, error=0.01, status="PASS", reason="")
    monkeypatch.setattr(selftest, "run", lambda devices=None, verbose=True, **kw: [passing, fail])
    assert selftest.main(["--device", "cpu", "--quiet"]) == 1
    assert "FAIL" in capsys.readouterr().out
    monkeypatch.setattr(selftest, "run", lambda devices=None, verbose=True, **kw: [passing])
    assert selftest.main(["--device", "cpu"]) == 0


def test_unavailable_cuda_is_reported_not_raised():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA rows run for real")
    rows = selftest.run(devices=["cuda"], verbose=False)
    assert len(rows) == 1 and rows[0]["status"] == "SKIP"


# --------------------------------------------------------------- --full, at small sizes (--quick)

def test_selftest_quick_cpu_passes(capsys):
    """The --full checks that need no GPU, at small sizes: the shape sweep against the float64
    reference (float32 and float64), two runs bit-equal, and the timing rows (no target)."""
    rows = selftest.run(devices=["cpu"], verbose=True, quick=True)
    bad = [(r["op"], r["dtype"], r["reason"]) for r in rows if r["status"] == "FAIL"]
    assert not bad, bad
    ops_seen = {r["op"] for r in rows}
    assert {f"pair_stats/{m}" for m in selftest.SWEEP_MODES} <= ops_seen
    assert {r["dtype"] for r in rows if r["op"].startswith("pair_stats/sweep/")} == {
        "float32", "float64"}
    assert any(r["op"] == "two runs bit-equal" and r["status"] == "PASS" for r in rows)
    timings = [r for r in rows if r["op"].startswith("time ")]
    assert len(timings) == 2 and all(r["status"] == "INFO" and r["error"] > 0 for r in timings)
    out = capsys.readouterr().out
    assert "2 timings without a target" in out


def test_sweep_covers_the_edge_shapes():
    shapes = [selftest._pair_inputs(m, torch.float32, "cpu") for m in selftest.SWEEP_MODES]
    sizes = [(x["q"].shape[0], x["k"].shape[0] if x["k"] is not None else None,
              x["q"].shape[1]) for x in shapes]
    assert (1, 1, 5) in sizes and (1, None, 3) in sizes           # N = M = 1, general and self
    assert any(d % 16 for _, _, d in sizes)                       # D not a multiple of 16
    assert any(n % 64 and n > 64 for n, _, _ in sizes)            # partial tiles
    empty = selftest._pair_inputs("sweep/empty-denominators", torch.float32, "cpu")
    assert (empty["q_label"] == 0).all() and empty["kwargs"]["denominator"] == "negatives"
    ignored = selftest._pair_inputs("sweep/all-ignored-rows", torch.float32, "cpu")
    assert (ignored["q_label"][:64] == -1).all()                  # a whole tile of them


def test_determinism_check_catches_a_nondeterministic_op(monkeypatch):
    calls = iter(range(10))
    monkeypatch.setattr(selftest, "_outputs_of",
                        lambda device, dtype: [torch.full((3,), float(next(calls)))])
    row = selftest.determinism_case("cpu", torch.float32)
    assert row["status"] == "FAIL" and row["error"] == 3


def test_sanitizer_without_the_tool_is_a_skip(monkeypatch):
    monkeypatch.setattr(selftest.shutil, "which", lambda name: None)
    row = selftest.sanitizer_case("memcheck")
    assert row["status"] == "SKIP" and "compute-sanitizer" in row["reason"]


def test_timing_rows_hold_their_targets():
    assert selftest._info_row("t", "cuda", "bf16", "-", "s", 0.010, 0.0112, 0.010 <= 0.0112)[
        "status"] == "PASS"
    assert selftest._info_row("t", "cuda", "bf16", "-", "s", 0.02, 0.0112, False)["status"] == "FAIL"
    assert selftest._info_row("t", "cpu", "f32", "-", "s", 0.02, None, None)["status"] == "INFO"


def test_cli_quick_exit_status():
    assert selftest.main(["--device", "cpu", "--quick", "--quiet"]) == 0
