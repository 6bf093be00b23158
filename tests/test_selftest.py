"""``fastiml selftest`` (fastiml/selftest.py): it passes on a correct build, and it fails -- or
skips with a reason, never crashes -- when it should.

The CPU run is what every machine can check; the CUDA run is the same comparisons on a GPU and is
skipped where none exists (there, the selftest is the users' first command).
"""
import json
import math
import os
import re
import subprocess
from pathlib import Path

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
                        "pivot_consistency", "clip_lse", "siglip_loss", "row_lse"}
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
    """How wrong a wrong kernel is: 1% in float32, 5% in the half dtypes (the low-precision
    rule, fastiml.testing.half_rule, allows 2 eps of a row: 1.6% in bfloat16). The selftest's
    earlier half rule (twice the error of a reference run wholly in the half dtype) passed
    +5 % bfloat16 gradients in all five modes."""
    return 0.01 if dtype == torch.float32 else 0.05


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


class _ScaleRows(torch.autograd.Function):
    """Identity forward; multiplies the gradient of rows [0, rows) by `factor`."""

    @staticmethod
    def forward(ctx, x, rows, factor):
        ctx.rows, ctx.factor = rows, factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g[:ctx.rows] *= ctx.factor
        return g, None, None


def test_two_group_row_judges_the_small_group_at_its_own_scale():
    """float16 self mode, upstream gradients 1e-3 (group 0) and 1e3 (group 1): group 0's
    gradients 5 % off are caught, though at group 1's scale they would be invisible."""
    mode = "self-two-groups"
    x = selftest._pair_inputs(mode, torch.float16, "cpu")
    half = x["q"].shape[0] // 2
    assert (x["q_group"][:half] == 0).all() and (x["q_group"][half:] == 1).all()
    assert half % 64 != 0  # the boundary inside a 64-row tile: two scales in one tile
    ratio = x["w_lse"][half:].double().abs().mean() / x["w_lse"][:half].double().abs().mean()
    assert 3e5 < ratio < 3e6

    def small_group_off(q, k, *args, **kw):
        return ops.pair_stats(_ScaleRows.apply(q, half, 1.05), k, *args, **kw)

    row = selftest.pair_stats_case("cpu", torch.float16, mode, impl=small_group_off)
    assert row["status"] == "FAIL" and "grad_q (group 0)" in row["reason"], row
    assert "group 1" not in row["reason"]
    assert selftest.pair_stats_case("cpu", torch.float16, mode)["status"] == "PASS"


def test_large_row_checks_every_row_against_float64(monkeypatch):
    """The large row (at its --quick size here, the reference in 3 chunks) fails on a 5 %
    error in grad_k alone, and on a wrong log-sum-exp in its last rows."""
    def k_off(q, k, *args, **kw):
        return ops.pair_stats(q, _ScaleGrad.apply(k, 1.05), *args, **kw)

    def tail_off(*args, **kw):
        lse, pos_mean, pos_count = ops.pair_stats(*args, **kw)
        return torch.cat([lse[:-7], lse[-7:] + 0.01]), pos_mean, pos_count

    assert selftest.large_case("cpu", quick=True, chunk=100)["status"] == "PASS"
    for wrong, output in ((k_off, "grad_k"), (tail_off, "lse")):
        monkeypatch.setattr(selftest, "_api", lambda name, f=wrong: f)
        row = selftest.large_case("cpu", quick=True, chunk=100)
        assert row["status"] == "FAIL" and output in row["reason"], row
        assert row["shape"].startswith("N=296 M=296 D=128")


def test_multi_tile_rows_set_the_hook_only_for_their_calls(monkeypatch):
    """pair_stats_case / pair_softplus_case / determinism_case with tiles="multi" run the ops
    with FASTIML_CUDA_FORCE_TILES=multi (and name the row "(unsplit)"), and restore the
    environment after; without `tiles` they leave it unset."""
    seen = []
    real_stats, real_softplus = ops.pair_stats, ops.pair_softplus

    def recording(real):
        def call(*args, **kw):
            seen.append(os.environ.get(selftest.FORCE_TILES_ENV))
            return real(*args, **kw)
        return call

    monkeypatch.delenv(selftest.FORCE_TILES_ENV, raising=False)
    monkeypatch.setattr(ops, "pair_stats", recording(real_stats))
    monkeypatch.setattr(ops, "pair_softplus", recording(real_softplus))
    row = selftest.pair_stats_case("cpu", torch.float32, "general", tiles="multi")
    assert row["op"] == "pair_stats/general (unsplit)" and row["status"] == "PASS", row
    assert any(c["name"].startswith("tiles per block") and c["ok"] for c in row["checks"])
    row = selftest.pair_softplus_case("cpu", torch.float32, "self", tiles="multi")
    assert row["op"] == "pair_softplus/self (unsplit)" and row["status"] == "PASS", row
    assert seen and set(seen) == {"multi"}
    assert selftest.FORCE_TILES_ENV not in os.environ
    seen.clear()
    row = selftest.determinism_case("cpu", torch.float32, tiles="multi")
    assert row["op"] == "two runs bit-equal (unsplit)" and row["status"] == "PASS"
    # Both runs call pair_stats and pair_softplus in three modes, all under the hook.
    assert len(seen) == 12 and set(seen) == {"multi"}
    seen.clear()
    selftest.pair_stats_case("cpu", torch.float32, "general")
    assert seen == [None]


def test_tf32_rows_call_pair_softplus_with_tf32_on_and_need_it_on_after(monkeypatch):
    """pair_softplus_case(tf32=True) runs the op with torch.backends.cuda.matmul.allow_tf32 on
    (row "(TF32 on)"), restores the user's setting after, and fails a row whose op left the
    flag off (the CUDA kernel turns it off for its own products only)."""
    flags = torch.backends.cuda.matmul
    seen = []
    real = ops.pair_softplus

    def recording(*args, **kw):
        seen.append(flags.allow_tf32)
        return real(*args, **kw)

    def leaves_tf32_off(*args, **kw):
        flags.allow_tf32 = False
        return real(*args, **kw)

    before = flags.allow_tf32  # a module attribute behind __getattr__: set and restore by hand
    flags.allow_tf32 = False
    try:
        monkeypatch.setattr(ops, "pair_softplus", recording)
        row = selftest.pair_softplus_case("cpu", torch.float32, "general", tf32=True)
        assert row["op"] == "pair_softplus/general (TF32 on)" and row["status"] == "PASS", row
        assert seen and set(seen) == {True} and flags.allow_tf32 is False
        seen.clear()
        selftest.pair_softplus_case("cpu", torch.float32, "general")
        assert seen == [False]
        monkeypatch.setattr(ops, "pair_softplus", leaves_tf32_off)
        row = selftest.pair_softplus_case("cpu", torch.float32, "general", tf32=True)
        assert row["status"] == "FAIL" and "allow_tf32" in row["reason"], row
        assert flags.allow_tf32 is False
    finally:
        flags.allow_tf32 = before


# What each all-pairs row must check: every output and every gradient.
ALL_PAIRS_CHECKS = {
    "clip_lse": {"row_lse", "col_lse", "diag", "grad_q", "grad_k", "grad_scale"},
    "siglip_loss": {"loss", "grad_q", "grad_k", "grad_scale", "grad_bias"},
    "row_lse/k-no-grad": {"lse", "grad_q", "grad_scale"},
    "row_lse/k-grad": {"lse", "grad_q", "grad_k", "grad_scale"},
}


def test_all_pairs_rows_pass_on_the_cpu_in_every_dtype():
    """clip_lse, siglip_loss and row_lse (k with and without a gradient) in every dtype, on
    300 rows against 530 columns: every output and gradient against float64."""
    rows = selftest.run(devices=["cpu"], verbose=False)
    seen = {(r["op"], r["dtype"]): r for r in rows if r["op"] in ALL_PAIRS_CHECKS}
    assert set(seen) == {(op, dtype) for op in ALL_PAIRS_CHECKS
                         for dtype in ("float32", "float16", "bfloat16")}
    for (op, dtype), r in seen.items():
        assert r["status"] == "PASS", r
        assert {c["name"] for c in r["checks"]} == ALL_PAIRS_CHECKS[op], r["checks"]
        assert r["shape"].startswith("N=300 M=530 D=40 scale=20")
    assert "bias=-5 offset=100" in seen["siglip_loss", "float32"]["shape"]


def _clip_scale_grad_off(q, k, scale):
    return ops.clip_lse(q, k, _ScaleGrad.apply(scale, 1 + _subtle(q.dtype)))


def _siglip_offset_off(q, k, scale, bias, offset):
    return ops.siglip_loss(q, k, scale, bias, offset=offset + 1)


def _row_lse_grad_off(q, k, scale):
    return ops.row_lse(_ScaleGrad.apply(q, 1 + _subtle(q.dtype)), k, scale)


def _row_lse_column_dropped(q, k, scale):
    return ops.row_lse(q, k[:-1], scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name, wrong, caught", [
    ("clip_lse", _clip_scale_grad_off, "grad_scale"),
    ("siglip_loss", _siglip_offset_off, "loss"),
    ("row_lse/k-no-grad", _row_lse_grad_off, "grad_q"),
    ("row_lse/k-grad", _row_lse_column_dropped, "lse"),
])
def test_selftest_catches_a_wrong_all_pairs_op(name, wrong, caught, dtype):
    row = selftest.all_pairs_case("cpu", dtype, name, impl=wrong)
    assert row["status"] == "FAIL" and caught in row["reason"], row
    op = selftest.ALL_PAIRS_CASES[name].op
    right = selftest.all_pairs_case("cpu", dtype, name, impl=getattr(ops, op))
    assert right["status"] == "PASS", right


def test_row_lse_rows_take_both_backward_paths():
    """row_lse's backward is elementwise from the saved mean when k takes no gradient and
    clip_lse's when it does: the two rows hand the op a k without and with requires_grad."""
    for name, k_grad in (("row_lse/k-no-grad", False), ("row_lse/k-grad", True)):
        seen = []

        def recording(q, k, scale):
            seen.append((q.requires_grad, k.requires_grad, scale.requires_grad))
            return ops.row_lse(q, k, scale)

        assert selftest.all_pairs_case("cpu", torch.float32, name, impl=recording)[
            "status"] == "PASS"
        assert seen == [(True, k_grad, True)]


@pytest.mark.parametrize("op", ["clip_lse", "siglip_loss", "row_lse"])
def test_two_runs_cover_the_all_pairs_ops(monkeypatch, op):
    """The run-twice workload calls each all-pairs op: one whose output changes from call to
    call fails the two-runs row."""
    calls = iter(range(1000))
    real = getattr(ops, op)

    def drifting(*args, **kwargs):
        out = real(*args, **kwargs)
        first = out[0] if isinstance(out, tuple) else out
        drift = first + 1e-3 * next(calls)
        return (drift, *out[1:]) if isinstance(out, tuple) else drift

    monkeypatch.setattr(ops, op, drifting)
    row = selftest.determinism_case("cpu", torch.float32)
    assert row["status"] == "FAIL", row


def test_cuda_chunk_rows_follow_the_kernel_constant():
    """The selftest's model of the CUDA all-pairs ops' row chunks uses the .cu file's constant,
    and the --full size spans three chunks of 1,023 rows (2^24 // 16,400)."""
    source = (Path(__file__).resolve().parents[1] / "csrc" / "ops" / "cuda"
              / "clip_siglip_kernel.cu").read_text()
    shift = re.search(r"kChunkElements = int64_t\(1\) << (\d+);", source)
    assert shift, "kChunkElements not found in clip_siglip_kernel.cu"
    assert selftest.CUDA_CHUNK_ELEMENTS == 1 << int(shift.group(1))
    assert selftest.cuda_chunk_rows(16400) == 1023
    assert selftest.cuda_chunks(selftest.ALL_PAIRS_LARGE) == 3
    assert selftest.cuda_chunks(selftest.ALL_PAIRS_LARGE_QUICK) == 1


def test_full_rows_check_the_all_pairs_ops_across_cuda_chunks():
    """--full has one float32 row per all-pairs op at the chunk-crossing size (the --quick size
    on the CPU), every output and gradient checked, and the shape names the chunk count."""
    rows = selftest.full_rows("cpu", quick=True)
    large = {r["op"]: r for r in rows if r["op"].endswith("/large")
             and not r["op"].startswith("pair_stats")}
    assert set(large) == {f"{name}/large" for name in ALL_PAIRS_CHECKS}
    for op, r in large.items():
        assert r["status"] == "PASS" and r["dtype"] == "float32", r
        assert {c["name"] for c in r["checks"]} == ALL_PAIRS_CHECKS[op[:-len("/large")]]
        assert r["shape"].startswith("N=600 M=1100 D=8") and r["shape"].endswith(
            ", 1 CUDA chunk"), r["shape"]


def _row_lse_off_past_the_first_chunk(q, k, scale):
    """row_lse whose rows past the first CUDA chunk are 1e-3 too large."""
    lse = ops.row_lse(q, k, scale)
    past = torch.arange(len(q), device=q.device) >= selftest.cuda_chunk_rows(len(k))
    return lse + 1e-3 * past


def _siglip_positives_at_chunk_offset(q, k, scale, bias, offset):
    """siglip_loss summed over the CUDA chunks with each chunk's positives at its local row
    + offset (the r0 of S.diagonal(r0 + offset) forgotten): right in the first chunk only."""
    rows = selftest.cuda_chunk_rows(len(k))
    return sum(ops.siglip_loss(q[r0:r0 + rows], k, scale, bias, offset=offset)
               for r0 in range(0, len(q), rows))


@pytest.mark.parametrize("name, wrong, caught", [
    ("row_lse/k-no-grad", _row_lse_off_past_the_first_chunk, "lse"),
    ("siglip_loss", _siglip_positives_at_chunk_offset, "loss"),
])
def test_large_all_pairs_row_catches_errors_past_the_first_cuda_chunk(name, wrong, caught):
    """At its --full size (run on the CPU here: 2-4 s) the row fails on an op that is right
    in the first CUDA chunk and wrong after it."""
    row = selftest.all_pairs_case("cpu", torch.float32, name, impl=wrong,
                                  size=selftest.ALL_PAIRS_LARGE)
    assert row["op"] == f"{name}/large"
    assert row["shape"].startswith("N=2100 M=16400 D=8") and "3 CUDA chunks" in row["shape"]
    assert row["status"] == "FAIL" and caught in row["reason"], row


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
    assert {"pair_stats/large", "pair_stats/self-two-groups"} <= ops_seen
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
                        lambda device, dtype, tiles=None: [torch.full((3,), float(next(calls)))])
    row = selftest.determinism_case("cpu", torch.float32)
    assert row["status"] == "FAIL" and row["error"] == 3


def test_sanitizer_without_the_tool_is_a_skip(monkeypatch):
    monkeypatch.setattr(selftest.shutil, "which", lambda name: None)
    row = selftest.sanitizer_case("memcheck")
    assert row["status"] == "SKIP" and "compute-sanitizer" in row["reason"]


def test_sanitizer_timeout_reaches_the_tool_run(monkeypatch):
    """--sanitizer-timeout: main passes it to run(), run() to each sanitizer run."""
    limits = []

    def too_slow(cmd, timeout, **kw):
        limits.append(timeout)
        raise subprocess.TimeoutExpired(cmd, timeout)

    monkeypatch.setattr(selftest.shutil, "which", lambda name: "/bin/compute-sanitizer")
    monkeypatch.setattr(selftest.subprocess, "run", too_slow)
    row = selftest.sanitizer_case("racecheck", 12.5)
    assert limits == [12.5] and "timed out after 12 s" in row["reason"]
    passed = {}
    monkeypatch.setattr(selftest, "run", lambda **kw: passed.update(kw) or [])
    assert selftest.main(["--device", "cpu", "--sanitizer-timeout", "600"]) == 0
    assert passed["sanitizer_timeout"] == 600.0
    assert selftest.main(["--device", "cpu"]) == 0
    assert passed["sanitizer_timeout"] == selftest.SANITIZER_TIMEOUT_S == 240.0
    with pytest.raises(SystemExit):
        selftest.main(["--sanitizer-timeout", "0"])


def test_sanitizer_workload_covers_every_dtype_with_multi_tile_blocks(monkeypatch):
    calls = []
    monkeypatch.setattr(selftest, "_outputs_of",
                        lambda device, dtype, tiles=None: calls.append((device, dtype, tiles)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    selftest.sanitizer_workload()
    assert {d for _, d, t in calls if t == "multi"} == {
        torch.float32, torch.float16, torch.bfloat16, torch.float64}
    assert {d for _, d, t in calls if t is None} == {torch.float32, torch.bfloat16}


def test_json_option_writes_the_rows(monkeypatch, tmp_path):
    """--json PATH: the rows, in strict JSON (NaN -> null, inf -> "inf")."""
    row = dict(op="pair_stats/general", device="cpu", dtype="float32", shape="-", output="lse",
               error=math.inf, tolerance=math.nan, status="FAIL", reason="x",
               checks=[dict(name="lse", error=math.inf, tolerance=0.5, ok=False)], seconds=0.1)
    monkeypatch.setattr(selftest, "run", lambda **kw: [row])
    path = tmp_path / "rows.json"
    assert selftest.main(["--device", "cpu", "--quiet", "--json", str(path)]) == 1

    def strict(constant):
        raise ValueError(f"not strict JSON: {constant}")
    rows = json.loads(path.read_text(), parse_constant=strict)
    assert rows == [dict(row, error="inf", tolerance=None,
                         checks=[dict(row["checks"][0], error="inf")])]


def test_timing_rows_hold_their_targets():
    assert selftest._info_row("t", "cuda", "bf16", "-", "s", 0.010, 0.0112, 0.010 <= 0.0112)[
        "status"] == "PASS"
    assert selftest._info_row("t", "cuda", "bf16", "-", "s", 0.02, 0.0112, False)["status"] == "FAIL"
    assert selftest._info_row("t", "cpu", "f32", "-", "s", 0.02, None, None)["status"] == "INFO"


def test_cli_quick_exit_status():
    assert selftest.main(["--device", "cpu", "--quick", "--quiet"]) == 0


def test_a_result_in_the_wrong_dtype_fails_its_row():
    """row_lse's lse must come back in float32 for float32 inputs: an op returning float64
    (values right) fails the row on the dtype check, naming it."""
    def float64_lse(q, k, scale):
        return ops.row_lse(q, k, scale).double()

    row = selftest.all_pairs_case("cpu", torch.float32, "row_lse/k-no-grad", impl=float64_lse)
    assert row["status"] == "FAIL" and "lse.dtype (torch.float64, expected torch.float32)" in (
        row["reason"]), row


# ------------------------------------------------------- no host synchronisation (CUDA rows)

def _seeding_a_sync(where):
    """ops.pair_stats with one synchronising call -- a warning as set_sync_debug_mode("warn")
    gives -- in its forward or its backward."""
    class SyncInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, lse):
            return lse.view_as(lse)

        @staticmethod
        def backward(ctx, grad):
            import warnings
            warnings.warn("called a synchronizing CUDA operation")
            return grad

    def impl(*args, **kwargs):
        lse, pos_mean, pos_count = ops.pair_stats(*args, **kwargs)
        if where == "forward":
            import warnings
            warnings.warn("called a synchronizing CUDA operation")
            return lse, pos_mean, pos_count
        return SyncInBackward.apply(lse), pos_mean, pos_count
    return impl


def test_sync_rows_are_cuda_rows():
    row = selftest.sync_case("cpu", "self")
    assert row["status"] == "SKIP" and "CUDA" in row["reason"]


@pytest.mark.parametrize("mode", selftest.SYNC_MODES)
def test_sync_rows_pass_an_op_that_does_not_sync(mode):
    row = selftest.sync_case("cpu", mode, impl=ops.pair_stats)
    assert row["status"] == "PASS", row["reason"]
    assert [c["name"] for c in row["checks"]] == ["forward syncs", "backward syncs"]


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_sync_rows_count_a_seeded_sync(where):
    row = selftest.sync_case("cpu", "groups", impl=_seeding_a_sync(where))
    assert row["status"] == "FAIL"
    assert row["reason"] == f"failed: {where} syncs (1 host synchronisation(s))"


@pytest.mark.skipif(_CUDA_SKIP is not None, reason=_CUDA_SKIP or "")
@pytest.mark.parametrize("mode", selftest.SYNC_MODES)
def test_pair_stats_does_not_sync_on_cuda(mode):
    row = selftest.sync_case("cuda", mode)
    assert row["status"] == "PASS", row["reason"]


def test_full_rows_include_the_sync_rows_on_cuda(monkeypatch):
    """The CUDA part of --full runs every SYNC_MODES row (the cases stubbed: no GPU here)."""
    seen = []
    monkeypatch.setattr(selftest, "sync_case", lambda device, mode: seen.append((device, mode))
                        or selftest._skip("s", device, "-", "-", "stub"))
    for name in ("pair_stats_case", "pair_softplus_case", "large_case", "all_pairs_case",
                 "determinism_case", "offsets64_case", "crosscheck_case", "sanitizer_case",
                 "pair_timing_case", "mpc_timing_case"):
        monkeypatch.setattr(selftest, name,
                            lambda *a, **k: selftest._skip("x", "cuda", "-", "-", "stub"))
    selftest.full_rows("cuda", quick=False)
    assert seen == [("cuda", mode) for mode in selftest.SYNC_MODES]
