"""Run-time CPU levels (csrc/ops/cpu/capability.h; README "CPU levels").

Every CPU kernel is built at three levels (baseline x86-64, AVX2 + FMA, AVX-512) and the level is
chosen at import from the CPU. Here each level this machine supports is held to the float64
reference; float64 results must be bit-equal across levels (same sum order, no FMA in float64);
float32 results may differ only by the last bits the FMA-contracted exponential moves. Levels the
CPU lacks are skipped with the reason.
"""
import functools
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import LEVELS, SUPPORTED_LEVELS
from fastiml import ops, reference

SUPPORTED = SUPPORTED_LEVELS
EPS32 = torch.finfo(torch.float32).eps


# ------------------------------------------------------------------------------- workloads

def _features(n, d, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return (scale * x).to(dtype)


def _labels(n, classes, seed, ignore_every=0):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, classes, (n,), generator=g)
    if ignore_every:
        lab[::ignore_every] = -1
    return lab


# Each case: (name, kwargs builder). Sizes cross tile borders (256) and leave partial tiles;
# "online" (|s| up to 50: no fixed shift) takes the running-max path, "self" the symmetric one.
PAIR_CASES = {
    "self_groups_ignore": dict(n=600, m=None, scale=1.0, groups=3, ignore_every=7,
                               exclude_self=True, denominator="all"),
    "general_negatives": dict(n=300, m=530, scale=1.0, groups=0, ignore_every=0,
                              exclude_self=False, denominator="negatives"),
    "self_online": dict(n=520, m=None, scale=5.0, groups=0, ignore_every=0,
                        exclude_self=True, denominator="all"),
}


def _pair_inputs(case, dtype):
    c = PAIR_CASES[case]
    q = _features(c["n"], 40, dtype, c["scale"], seed=1).requires_grad_()
    ql = _labels(c["n"], 4, seed=2, ignore_every=c["ignore_every"])
    qg = torch.arange(c["n"]) * c["groups"] // c["n"] if c["groups"] else None
    if c["m"] is None:
        return q, None, ql, None, qg, None, c
    k = _features(c["m"], 40, dtype, c["scale"], seed=3).requires_grad_()
    return q, k, ql, _labels(c["m"], 4, seed=4), qg, None, c


def _pair_stats_run(fn, case, dtype):
    """lse, pos_mean and the gradients of a loss that weighs both with random upstream grads."""
    q, k, ql, kl, qg, kg, c = _pair_inputs(case, dtype)
    lse, pos_mean, _ = fn(q, k, ql, kl, qg, kg, tau=0.1, exclude_self=c["exclude_self"],
                          denominator=c["denominator"])
    g = torch.Generator().manual_seed(5)
    w1 = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.dtype)
    w2 = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.dtype)
    finite = torch.isfinite(lse)
    loss = (torch.where(finite, lse, 0) * w1).sum() + (pos_mean * w2).sum()
    leaves = [q] if k is None else [q, k]
    grads = torch.autograd.grad(loss, leaves)
    return {"lse": lse.detach(), "pos_mean": pos_mean.detach(),
            **{f"grad{i}": t for i, t in enumerate(grads)}}


def _pair_softplus_run(fn_stats, fn_softplus, dtype):
    q = _features(520, 24, dtype, seed=6).requires_grad_()
    lab = torch.arange(520) // 2  # SimCLR-style pairs: one positive each
    lse, _, _ = fn_stats(q, None, lab, None, tau=0.2, exclude_self=True,
                         denominator="negatives")
    total, weight = fn_softplus(q, None, lab, None, lse=lse, tau=0.2, exclude_self=True)
    (grad,) = torch.autograd.grad(total.sum(), [q])
    return {"total": total.detach(), "weight": weight.detach(), "grad": grad,
            "lse": lse.detach()}


def _clip_siglip_run(fn_clip, fn_siglip, dtype):
    """clip_lse (rows, columns and diagonal weighed by random upstream gradients) and
    siglip_loss with every gradient, on a non-square problem (300 x 530: partial tiles)."""
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    q = _features(300, 40, dtype, seed=8).requires_grad_()
    k = _features(530, 40, dtype, seed=9).requires_grad_()
    scale = torch.tensor(20.0, dtype=stat, requires_grad=True)
    bias = torch.tensor(-5.0, dtype=stat, requires_grad=True)
    g = torch.Generator().manual_seed(10)
    weights = [torch.randn(n, generator=g, dtype=torch.float64).to(stat) for n in (300, 530, 300)]
    out = fn_clip(q, k, scale)
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights)), [q, k, scale])
    loss = fn_siglip(q, k, scale, bias, offset=100)
    sig_grads = torch.autograd.grad(loss, [q, k, scale, bias])
    return {"lse": out[0].detach(), "col_lse": out[1].detach(), "diag": out[2].detach(),
            **{f"grad{i}": t for i, t in enumerate(grads)}, "siglip": loss.detach(),
            **{f"siglip_grad{i}": t for i, t in enumerate(sig_grads)}}


def _row_lse_run(fn, dtype):
    """row_lse with q's and the scale's gradients, few rows against many keys (one row tile:
    the columns split among threads; a partial column tile)."""
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    q = _features(100, 40, dtype, seed=11).requires_grad_()
    k = _features(1500, 40, dtype, seed=12)
    scale = torch.tensor(20.0, dtype=stat, requires_grad=True)
    w = torch.randn(100, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    lse = fn(q, k, scale)
    grads = torch.autograd.grad((lse * w.to(lse.dtype)).sum(), [q, scale])
    return {"lse": lse.detach(), **{f"grad{i}": t for i, t in enumerate(grads)}}


def _contour_pivot_run(dtype):
    g = torch.Generator().manual_seed(7)
    mask = torch.rand(2, 37, 53, generator=g) > 0.6
    frac, klass = ops.contour_mine(mask, 4, lo=0.1, hi=0.9)
    band = ops.contour_band(mask, 3)
    a = (3 * torch.randn(2, 1, 37, 53, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    b = (3 * torch.randn(2, 1, 37, 53, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    loss = ops.pivot_consistency(a, b, klass, 4, weight_contour=1.0, weight_other=0.25)
    ga, gb = torch.autograd.grad(loss, [a, b])
    return {"frac": frac, "klass": klass, "band": band, "pivot": loss.detach(), "grad_a": ga,
            "grad_b": gb}, (mask, a.detach(), b.detach())


# --------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("case", list(PAIR_CASES))
def test_pair_stats_matches_float64_at_each_level(at_level, level, case):
    at_level(level)
    got = _pair_stats_run(ops.pair_stats, case, torch.float32)
    # The reference in float64 on the same (float32) values.
    want = _pair_stats_run(lambda q, k, *a, **kw: reference.pair_stats(
        q.double(), None if k is None else k.double(), *a, **kw), case, torch.float32)
    finite = torch.isfinite(want["lse"])
    assert torch.equal(torch.isfinite(got["lse"]), finite)
    # float32 accumulation over M terms: error ~ eps32 (|lse| + bound + sqrt(M)); 8x margin.
    scale = want["lse"][finite].abs().max() + 60
    assert (got["lse"][finite].double() - want["lse"][finite]).abs().max() <= 8 * EPS32 * scale
    assert (got["pos_mean"].double() - want["pos_mean"]).abs().max() <= 8 * EPS32 * scale
    for name in [k for k in got if k.startswith("grad")]:
        err = (got[name].double() - want[name]).norm(dim=1)
        assert (err <= 64 * EPS32 * scale * (want[name].norm(dim=1) + 1e-3)).all(), name


@pytest.mark.parametrize("level", LEVELS)
def test_pair_softplus_matches_float64_at_each_level(at_level, level):
    at_level(level)
    got = _pair_softplus_run(ops.pair_stats, ops.pair_softplus, torch.float32)
    want = _pair_softplus_run(
        lambda q, *a, **kw: reference.pair_stats(q.double(), *a, **kw),
        lambda q, *a, lse, **kw: reference.pair_softplus(q.double(), *a, lse=lse.double(), **kw),
        torch.float32)
    for name in got:
        tol = 1e-4 * (want[name].abs().max() + 1)
        assert (got[name].double() - want[name]).abs().max() <= tol, name


@pytest.mark.parametrize("level", LEVELS)
def test_clip_and_siglip_match_float64_at_each_level(at_level, level):
    at_level(level)
    got = _clip_siglip_run(ops.clip_lse, ops.siglip_loss, torch.float32)
    want = _clip_siglip_run(
        lambda q, k, t: reference.clip_lse(q.double(), k.double(), t.double()),
        lambda q, k, t, b, **kw: reference.siglip_loss(q.double(), k.double(), t.double(),
                                                       b.double(), **kw), torch.float32)
    for name in got:
        tol = 1e-5 * (want[name].abs().max() + 1)
        assert (got[name].double() - want[name]).abs().max() <= tol, name


@pytest.mark.parametrize("level", LEVELS)
def test_row_lse_matches_float64_at_each_level(at_level, level):
    at_level(level)
    got = _row_lse_run(ops.row_lse, torch.float32)
    want = _row_lse_run(lambda q, k, t: reference.row_lse(q.double(), k.double(), t.double()),
                        torch.float32)
    for name in got:
        tol = 1e-5 * (want[name].abs().max() + 1)
        assert (got[name].double() - want[name]).abs().max() <= tol, name


@pytest.mark.parametrize("level", LEVELS)
def test_contour_and_pivot_match_float64_at_each_level(at_level, level):
    at_level(level)
    got, (mask, a, b) = _contour_pivot_run(torch.float32)
    frac, klass = reference.contour_mine(mask, 4, lo=0.1, hi=0.9)
    assert torch.equal(got["klass"], klass)
    torch.testing.assert_close(got["frac"].double(), frac.double(), rtol=0, atol=1e-6)
    assert torch.equal(got["band"], reference.contour_band(mask, 3))
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    loss = reference.pivot_consistency(a64, b64, klass, 4, weight_contour=1.0, weight_other=0.25)
    ga, gb = torch.autograd.grad(loss, [a64, b64])
    want = float(loss.detach())
    assert abs(float(got["pivot"]) - want) <= 1e-5 * abs(want)
    for g, w in ((got["grad_a"], ga), (got["grad_b"], gb)):
        assert (g.double() - w).abs().max() <= 1e-5 * w.abs().max()


def _all_outputs(dtype):
    out = {}
    for case in PAIR_CASES:
        run = _pair_stats_run(ops.pair_stats, case, dtype)
        out.update({f"{case}.{k}": v for k, v in run.items()})
    out.update({f"softplus.{k}": v for k, v in
                _pair_softplus_run(ops.pair_stats, ops.pair_softplus, dtype).items()})
    out.update({f"clip.{k}": v for k, v in
                _clip_siglip_run(ops.clip_lse, ops.siglip_loss, dtype).items()})
    out.update({f"row.{k}": v for k, v in _row_lse_run(ops.row_lse, dtype).items()})
    out.update({f"contour.{k}": v for k, v in _contour_pivot_run(dtype)[0].items()})
    return out


def _outputs_at_default_and(at_level, level, dtype):
    """Every workload's outputs at the default level, then at ``level``."""
    at_level("default")
    base = _all_outputs(dtype)
    at_level(level)
    return base, _all_outputs(dtype)


@pytest.mark.parametrize("level", LEVELS)
def test_float64_is_bit_equal_across_levels(at_level, level):
    """Same sum order at every level, and float64 has no FMA-contracted exponential: any
    difference here is a reordered sum or a level computing something else."""
    base, other = _outputs_at_default_and(at_level, level, torch.float64)
    for name in base:
        assert torch.equal(base[name], other[name]), name


@pytest.mark.parametrize("level", LEVELS)
def test_float32_differs_across_levels_only_in_the_last_bits(at_level, level):
    """float32's exponential is exp_acc's polynomial, in FMAs at avx2 / avx512 and in separate
    multiplies and adds at the default level: <= 2 ulp apart. A log-sum-exp then moves by
    <= eps (2 + |lse|) (the sum's relative change, plus one rounding of m + log l), and every
    exp(s - lse) -- so every gradient term -- by that relative amount. Bounds: 8x that, per row
    for gradients (against the row's norm, floored at the rows' RMS norm: rows whose terms
    cancel keep their terms' rounding). Sum order is held by the float64 test above; this one
    catches a level whose float32 arithmetic differs by more, e.g. another polynomial."""
    base, other = _outputs_at_default_and(at_level, level, torch.float32)
    for name, x in base.items():
        y = other[name]
        if not x.is_floating_point():
            assert torch.equal(x, y), name
            continue
        assert torch.equal(torch.isfinite(x), torch.isfinite(y)), name
        lse = base.get(name.split(".")[0] + ".lse")
        big = 0.0 if lse is None else float(lse[torch.isfinite(lse)].abs().max())
        bound = 8 * EPS32 * (2 + big)
        x, y = x.double(), y.double()
        if x.dim() == 2:  # gradients: per row
            norm = x.norm(dim=1).clamp(min=float(x.norm(dim=1).square().mean().sqrt()))
            assert ((x - y).norm(dim=1) <= bound * norm).all(), name
        else:
            f = torch.isfinite(x)
            assert ((x[f] - y[f]).abs() <= bound * (x[f].abs() + 1)).all(), name


def test_the_default_level_is_this_cpus_best_or_a_requested_lower_one():
    requested = os.environ.get("FASTIML_CPU_CAPABILITY") or os.environ.get("ATEN_CPU_CAPABILITY")
    if not requested:
        assert ops.cpu_capability() == SUPPORTED[-1]
    assert ops.cpu_capability() in SUPPORTED


def test_set_cpu_capability_rejects_bad_levels(at_level):
    with pytest.raises(ValueError, match="'default', 'avx2', 'avx512'.*'sse9'"):
        ops.set_cpu_capability("sse9")
    with pytest.raises(TypeError, match="level must be a str"):
        ops.set_cpu_capability(2)
    for level in ops.CPU_CAPABILITIES:
        if level not in SUPPORTED:
            with pytest.raises(ValueError, match=f"'{level}' is not supported here"):
                ops.set_cpu_capability(level)
    ops.set_cpu_capability("AVX2" if "avx2" in SUPPORTED else "DEFAULT")  # case-insensitive


def _level_in_child(env_extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("FASTIML_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c",
                           "import fastiml.ops as o; print(o.cpu_capability())"],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("level", LEVELS)
def test_fastiml_cpu_capability_sets_the_level_at_import(level):
    proc = _level_in_child({"FASTIML_CPU_CAPABILITY": level})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [level]


def test_an_unknown_or_unsupported_request_fails_the_import_clearly():
    proc = _level_in_child({"FASTIML_CPU_CAPABILITY": "sse9"})
    assert proc.returncode != 0
    assert "FASTIML_CPU_CAPABILITY must be one of" in proc.stderr and "'sse9'" in proc.stderr
    lacking = [lv for lv in ops.CPU_CAPABILITIES if lv not in SUPPORTED]
    if not lacking:
        pytest.skip("this CPU supports every level: no unsupported request to try")
    proc = _level_in_child({"FASTIML_CPU_CAPABILITY": lacking[-1]})
    assert proc.returncode != 0 and "is not supported on this CPU" in proc.stderr


@pytest.mark.skipif("avx2" not in SUPPORTED, reason="this CPU lacks avx2")
def test_aten_cpu_capability_caps_the_level():
    proc = _level_in_child({"ATEN_CPU_CAPABILITY": "default"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["default"]


# Mnemonics of AVX / AVX-512 instructions (VEX / EVEX encoded: v*, mask-register k*) and
# registers only they use.
_AVX = re.compile(r"^\s*[0-9a-f]+:\s+(v(?!err|erw)[a-z0-9]+|k(?:and|or|xor|not|mov|shift|test|"
                  r"unpck|add)[a-z]*)\s|%[yz]mm|%k[0-7]")
_LEVEL_NAMESPACES = ("7fastiml4avx2", "7fastiml6avx512")  # fastiml::avx2, fastiml::avx512


def _reads_disassembly(test):
    """The marks of a test that reads the built library's x86-64 disassembly."""
    x86_64_linux = sys.platform.startswith("linux") and os.uname().machine == "x86_64"
    test = pytest.mark.skipif(shutil.which("objdump") is None,
                              reason="objdump (binutils) not installed")(test)
    return pytest.mark.skipif(not x86_64_linux, reason="x86-64 Linux only")(test)


@functools.lru_cache(maxsize=1)
def _disassembly():
    """(function, instruction line) for every instruction of the built library."""
    from fastiml import _C
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", _C.__file__],
                         capture_output=True, text=True, check=True).stdout
    lines, function = [], None
    for line in dis.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            function = head.group(1)
        elif function:
            lines.append((function, line))
    return lines


@pytest.mark.skipif(os.environ.get("FASTIML_CPU_FLAGS", "") != "",
                    reason="FASTIML_CPU_FLAGS may compile the base code for a wider ISA")
@_reads_disassembly
def test_no_avx_instruction_outside_the_level_namespaces():
    """Import must never raise SIGILL: only code in fastiml::avx2 / fastiml::avx512, which runs
    only when the CPU has the level, may hold AVX instructions -- not an inline std / c10 / ATen
    function the linker could pick for the whole library, nor a static initialiser."""
    offenders, in_levels = {}, 0
    for function, line in _disassembly():
        if _AVX.search(line):
            if any(ns in function for ns in _LEVEL_NAMESPACES):
                in_levels += 1
            else:
                offenders.setdefault(function, line.strip())
    assert in_levels > 1000, "the avx2 / avx512 variants are missing from the library"
    assert not offenders, f"AVX outside the level namespaces: {list(offenders.items())[:5]}"


@_reads_disassembly
def test_pivot_kernels_keep_their_prefetch():
    """pivot_consistency asks for the next pixel row's scattered counted pixels
    (prefetch_next_row in pivot_kernel.cpp): at patch 4 that halves its time, and nothing else
    would notice if the compiler dropped it -- as GCC does with calls to a function that only
    prefetches, unless it is inlined."""
    levels = {"base": "7fastiml5pivot", "avx2": "7fastiml4avx25pivot",
              "avx512": "7fastiml6avx5125pivot"}
    prefetches = {level: 0 for level in levels}
    for function, line in _disassembly():
        if "prefetcht0" in line:
            for level, namespace in levels.items():
                prefetches[level] += namespace in function
    assert all(prefetches.values()), f"prefetch instructions in the pivot kernels: {prefetches}"


# Per-element math that the CPU kernels' vectorised loops call (FASTIML_HD_INLINE in
# csrc/ops/common.h and pivot.h), by mangled name at every level.
_FORCED_INLINE = re.compile(r"\bcall\b.*<_ZN7fastiml\w*?(12exp_in_range|15exp_nonpositive|7abs_acc|"
                            r"5pivot7sigmoid|5pivot8jeffreys|5pivot13jeffreys_grad)")


@_reads_disassembly
def test_per_element_math_is_never_called():
    """A call to the per-element math left in a loop keeps that loop scalar: at the base level
    pivot's backward over every pixel took 4x as long when GCC stopped inlining jeffreys_grad,
    with every result still right."""
    calls = {}
    for function, line in _disassembly():
        match = _FORCED_INLINE.search(line)
        if match:
            calls.setdefault(match.group(1), function)
    assert not calls, f"out-of-line calls (callee: a caller): {calls}"
