"""Image-major groups: pair_stats skips tiles whose rows and columns share no group.

Groups sorted along the rows give tiles with narrow group ranges; tiles that meet no common
group are never multiplied. The results must be those of the reference all the same, on tile
boundaries that split a group, with whole tiles of one group, and with ignored entries.
"""
import pytest
import torch

from fastiml import ops, reference


def sorted_groups(sizes, generator):
    return torch.cat([torch.full((n,), g, dtype=torch.long) for g, n in enumerate(sizes)])


@pytest.mark.parametrize("mode", ["self", "general"])
@pytest.mark.parametrize("denominator", ["all", "negatives"])
def test_sorted_groups_match_reference(mode, denominator):
    g = torch.Generator().manual_seed(5)
    sizes = [300, 40, 513, 7]  # groups that straddle, fill and fall inside 256-row tiles
    groups = sorted_groups(sizes, g)
    n, d = len(groups), 12
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 3, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.1] = -1
    if mode == "self":
        args = (x, None, labels, None, groups, None)
        kwargs = {"exclude_self": True}
    else:
        m_sizes = [100, 0, 600, 30]  # the second group has no column at all
        k_groups = sorted_groups(m_sizes, g)
        k = torch.nn.functional.normalize(
            torch.randn(len(k_groups), d, generator=g, dtype=torch.float64), dim=1)
        k_labels = torch.randint(0, 3, (len(k_groups),), generator=g)
        args = (x, k, labels, k_labels, groups, k_groups)
        kwargs = {}
    w = torch.randn(n, dtype=torch.float64, generator=g)
    leaves = [a for a in args[:2] if a is not None]

    def run(fn):
        inputs = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                  else a for a in args]
        lse, mean, count = fn(*inputs, tau=0.1, denominator=denominator, **kwargs)
        loss = (torch.where(torch.isfinite(lse), lse, 0.0) * w).sum() + (mean * w.flip(0)).sum()
        grads = torch.autograd.grad(loss, [t for t in inputs[:2] if t is not None])
        return lse, mean, count, grads

    got, want = run(ops.pair_stats), run(reference.pair_stats)
    assert torch.equal(torch.isfinite(got[0]), torch.isfinite(want[0]))
    fin = torch.isfinite(want[0])
    torch.testing.assert_close(got[0][fin], want[0][fin])
    torch.testing.assert_close(got[1], want[1])
    assert torch.equal(got[2], want[2])
    assert len(leaves) == len(got[3])
    for a, b in zip(got[3], want[3]):
        torch.testing.assert_close(a, b)
