"""Shared fixtures and helpers of the fastiml tests (STYLE rule 11).

* ``device``: every op test runs on "cpu" and on "cuda"; the CUDA case is skipped, with the
  reason shown in the report, where no GPU (or no CUDA build of the extension) is present --
  it never passes silently.
* ``seed``: every test starts from the same torch RNG state (autouse).
* ``num_threads``: pins torch's intra-op thread count for a test and restores it afterwards.
* ``LEVELS`` / ``at_level``: the CPU kernel levels as test parameters, and a fixture that runs
  the kernels at one of them.
* ``assert_close_half_rule``: the low-precision rule -- the error against a float64 ground truth
  of the same input values, per row, bounded by a documented multiple of the dtype's epsilon
  times the float64 result's scale (``fastiml.testing.half_rule``, shared with
  ``fastiml selftest``, derives the bound).
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("fastiml") is None:  # running from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastiml import ops  # noqa: E402  (after the path fix above)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 CPU cores "
                                       "(deselect with -m 'not slow')")


# ---------------------------------------------------------------------------------- devices

def _cuda_skip_reason():
    if not torch.cuda.is_available():
        return "CUDA is not available (torch.cuda.is_available() is False)"
    if not ops.compiled_with_cuda():
        return "fastiml._C was built without its CUDA kernels"
    return None


_CUDA_SKIP = _cuda_skip_reason()

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(_CUDA_SKIP is not None,
                                                  reason=_CUDA_SKIP or "")),
]


@pytest.fixture(params=DEVICES)
def device(request):
    """The device a test runs on (a string)."""
    return request.param


# ---------------------------------------------------------------------------------- seeding

SEED = 0


@pytest.fixture(autouse=True)
def seed():
    """Seeds torch's global RNG before every test; returns the seed."""
    torch.manual_seed(SEED)
    return SEED


def generator(seed: int = SEED) -> torch.Generator:
    """A CPU generator, for tests that want their own stream of random numbers."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@pytest.fixture
def num_threads():
    """``num_threads(n)`` pins torch's intra-op thread count; restored after the test."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# CPU kernel levels (fastiml.ops.CPU_CAPABILITIES) as test parameters: the ones this CPU lacks
# are skipped with the reason.
SUPPORTED_LEVELS = ops.supported_cpu_capabilities()


def _level(level):
    missing = level not in SUPPORTED_LEVELS
    return pytest.param(level, id=level, marks=pytest.mark.skipif(
        missing, reason=f"this CPU lacks {level!r} (it runs at most {SUPPORTED_LEVELS[-1]!r})"))


LEVELS = [_level(level) for level in ops.CPU_CAPABILITIES]


@pytest.fixture
def at_level():
    """``at_level(level)`` runs the CPU kernels at `level` inside the test; restored after."""
    previous = ops.cpu_capability()
    yield ops.set_cpu_capability
    ops.set_cpu_capability(previous)


# ------------------------------------------------------------------------------- tolerances

def assert_same_neg_inf(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """The -inf entries (empty log-sum-exp) are the same, and nothing is NaN or +inf."""
    assert not torch.isnan(actual).any(), f"{name}: NaN in the result"
    assert not torch.isposinf(actual).any(), f"{name}: +inf in the result"
    mismatch = torch.isneginf(actual).cpu() != torch.isneginf(expected).cpu()
    assert not mismatch.any(), (f"{name}: -inf pattern differs at rows "
                                f"{mismatch.nonzero().flatten().tolist()[:20]}")


# The low-precision rule lives in the package (fastiml/testing.py), so that `fastiml selftest`
# judges a GPU's half-precision results by the same bound as these tests.
from fastiml.testing import (EPS32, HALF_RULE_FACTOR, float32_arg_error,  # noqa: E402,F401
                             half_rule, similarity_span)


def assert_close_half_rule(actual: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype,
                           name: str = "", *, arg_error: float = 0.0, log_domain: bool = False,
                           factor: float = HALF_RULE_FACTOR) -> float:
    """``fastiml.testing.half_rule`` (its docstring derives the bound) as an assertion:
    ``actual`` against ``exact``, the float64 result of the same input values, row by row;
    -inf entries must match, NaN and +inf fail. Returns the margin, the largest ratio
    error / bound (<= 1 passes), so that its use can be measured."""
    assert actual.shape == exact.shape, (f"{name}: shape {tuple(actual.shape)} vs "
                                         f"{tuple(exact.shape)}")
    if exact.is_floating_point():
        assert_same_neg_inf(actual, exact, name)
    rule = half_rule(actual, exact, dtype, arg_error=arg_error, log_domain=log_domain,
                     factor=factor)
    assert rule.ok, f"{name}: {rule.message}"
    return rule.margin


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float,
                        name: str = "", atol_floor: float = 0.0) -> None:
    """``assert_close`` with ``atol = rtol * max|expected|`` (so that tiny entries of a large
    result are judged against the result's scale), NaN-free, -inf entries matched exactly.
    ``atol_floor``: the rounding error of the inputs the result is computed from, for results
    that cancel to (near) zero."""
    assert actual.shape == expected.shape, (f"{name}: shape {tuple(actual.shape)} vs "
                                            f"{tuple(expected.shape)}")
    a, e = actual.detach(), expected.detach().to(actual.device)
    if e.is_floating_point():
        assert_same_neg_inf(a, e, name)
        finite = torch.isfinite(e)
        a, e = a[finite].double(), e[finite].double()
    scale = e.abs().max().item() if e.numel() else 0.0
    torch.testing.assert_close(a, e.to(a.dtype), rtol=rtol,
                               atol=max(rtol * max(scale, 1e-3), atol_floor),
                               msg=lambda m: f"{name}: {m}")
