"""Shared fixtures and helpers of the fastiml tests (STYLE rule 11).

* ``device``: every op test runs on "cpu" and on "cuda"; the CUDA case is skipped, with the
  reason shown in the report, where no GPU (or no CUDA build of the extension) is present --
  it never passes silently.
* ``seed``: every test starts from the same torch RNG state (autouse).
* ``num_threads``: pins torch's intra-op thread count for a test and restores it afterwards.
* ``assert_close_half_rule``: FlashAttention's rule for half dtypes -- the kernel's error
  against a float64 ground truth must be at most twice the error of the plain-PyTorch reference
  run in that same half dtype, plus a small absolute floor -- instead of magic tolerances.
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


# ------------------------------------------------------------------------------- tolerances

def assert_same_neg_inf(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """The -inf entries (empty log-sum-exp) are the same, and nothing is NaN or +inf."""
    assert not torch.isnan(actual).any(), f"{name}: NaN in the result"
    assert not torch.isposinf(actual).any(), f"{name}: +inf in the result"
    mismatch = torch.isneginf(actual).cpu() != torch.isneginf(expected).cpu()
    assert not mismatch.any(), (f"{name}: -inf pattern differs at rows "
                                f"{mismatch.nonzero().flatten().tolist()[:20]}")


def _finite_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    a, e = actual.detach().double().cpu(), exact.detach().double().cpu()
    finite = torch.isfinite(e)
    if not finite.any():
        return 0.0
    return (a[finite] - e[finite]).abs().max().item()


def half_floor(exact: torch.Tensor, dtype: torch.dtype) -> float:
    """The absolute floor of the half-precision rule: a few units in the last place of
    ``dtype`` at the magnitude of the (finite) exact values."""
    e = exact.detach().double()
    e = e[torch.isfinite(e)]
    scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
    return 4 * torch.finfo(dtype).eps * scale


def assert_close_half_rule(actual: torch.Tensor, exact: torch.Tensor, reference_half: torch.Tensor,
                           dtype: torch.dtype, name: str = "", factor: float = 2.0) -> None:
    """FlashAttention's low-precision rule.

    ``exact`` is the float64 ground truth (computed from the *same* half-precision input values,
    upcast), ``reference_half`` the plain-PyTorch reference run in ``dtype``. The kernel passes
    when ``max|actual - exact| <= factor * max|reference_half - exact| + floor``, with ``floor``
    a few ulps of ``dtype`` at the scale of ``exact``. -inf entries must match exactly.
    """
    assert actual.shape == exact.shape, (f"{name}: shape {tuple(actual.shape)} vs "
                                         f"{tuple(exact.shape)}")
    if exact.is_floating_point():
        assert_same_neg_inf(actual, exact, name)
    err = _finite_error(actual, exact)
    err_ref = _finite_error(reference_half, exact)
    bound = factor * err_ref + half_floor(exact, dtype)
    assert err <= bound, (f"{name}: kernel error {err:.3g} > {factor} x reference error "
                          f"{err_ref:.3g} + floor ({bound:.3g}) in {dtype}")


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
