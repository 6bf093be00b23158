"""pair_softplus (NT-Xent's positive-pair sum, DESIGN 9) held to fastiml.reference (float64,
materialised): values, gradients wrt q, k and lse with grad_output != 1, adversarial cases,
half precision under the low-precision rule (conftest), gradcheck, opcheck, torch.compile, bad
input.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import (assert_close_half_rule, assert_close_scaled, float32_arg_error, generator,
                      similarity_span)
from fastiml import ops, reference

TAU = 0.2


def problem(n, m, d, classes, *, self_mode=False, groups=False, ignore=False, dtype=torch.float64,
            scale=1.0, seed=0, device="cpu"):
    g = generator(seed)
    q = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1) * scale
    k = None if self_mode else F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64),
                                           dim=1) * scale
    ql = torch.randint(0, classes, (n,), generator=g)
    kl = None if self_mode else torch.randint(0, classes, (m,), generator=g)
    if ignore:
        ql[torch.rand(n, generator=g) < 0.2] = -1
        if kl is not None:
            kl[torch.rand(m, generator=g) < 0.2] = -1
    qg = kg = None
    if groups:
        qg = torch.randint(0, 3, (n,), generator=g).sort().values
        kg = None if self_mode else torch.randint(0, 3, (m,), generator=g).sort().values
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dict(q=q.to(dtype).to(device), k=to(None if k is None else k.to(dtype)), q_label=to(ql),
                k_label=to(kl), q_group=to(qg), k_group=to(kg), exclude_self=self_mode)


def negatives_lse(p):
    lse, _, _ = ops.pair_stats(p["q"], p["k"], p["q_label"], p["k_label"], p["q_group"],
                               p["k_group"], tau=TAU, exclude_self=p["exclude_self"],
                               denominator="negatives")
    return lse.detach()


def evaluate(fn, p, lse, weights):
    """(total, weight) and the gradients of sum(weights * total) wrt q, k, lse."""
    q = p["q"].detach().clone().requires_grad_()
    k = None if p["k"] is None else p["k"].detach().clone().requires_grad_()
    lse = lse.clone().requires_grad_()
    total, weight = fn(q, k, p["q_label"], p["k_label"], p["q_group"], p["k_group"], lse=lse,
                       tau=TAU, exclude_self=p["exclude_self"])
    leaves = [q, lse] + ([] if k is None else [k])
    grads = torch.autograd.grad((total.double() * weights).sum(), leaves)
    return total.detach(), weight.detach(), grads


CASES = {  # n, m, d, classes, options
    "one_tile": (13, 11, 5, 3, {}),
    "tiles": (300, 520, 9, 4, {}),  # more than one 256 tile both ways
    "self_tiles": (300, None, 8, 5, {"self_mode": True}),
    "groups_ignore": (70, 90, 6, 3, {"groups": True, "ignore": True}),
    "self_groups_ignore": (80, None, 7, 3, {"self_mode": True, "groups": True, "ignore": True}),
    "one_row": (1, 6, 4, 2, {}),
    "odd_d": (40, 33, 1, 2, {}),
    "many_classes": (600, None, 16, 290, {"self_mode": True}),  # sparse positives: tile skips
    "unnormalised": (50, 60, 6, 3, {"scale": 5.0}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference(name, device):
    n, m, d, classes, options = CASES[name]
    p = problem(n, m, d, classes, device=device, **options)
    lse = negatives_lse(p)
    weights = torch.randn(n, generator=generator(1), dtype=torch.float64).to(device)
    ours = evaluate(ops.pair_softplus, p, lse, weights)
    exact = evaluate(reference.pair_softplus, p, lse, weights)
    assert ours[0].dtype == torch.float64 and ours[1].dtype == torch.float64
    assert_close_scaled(ours[0], exact[0], 1e-10, "total")
    assert_close_scaled(ours[1], exact[1], 1e-10, "weight")
    for i, (a, b) in enumerate(zip(ours[2], exact[2])):
        assert_close_scaled(a, b, 1e-10, f"grad {i}")


def test_by_hand():
    """Two rows, three columns: row 0 has positives 0 and 2 and negative 1; row 1 (label 5)
    has no positive; values from the definition."""
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    k = torch.tensor([[0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    ql, kl = torch.tensor([0, 5]), torch.tensor([0, 1, 0])
    s = q @ k.t() / TAU
    lse = torch.tensor([s[0, 1].item(), s[1].logsumexp(0).item()], dtype=torch.float64)
    total, weight = ops.pair_softplus(q, k, ql, kl, lse=lse, tau=TAU)
    x = lse[0] - s[0, [0, 2]]
    torch.testing.assert_close(total, torch.stack([torch.log1p(x.exp()).sum(), torch.tensor(
        0.0, dtype=torch.float64)]), rtol=1e-14, atol=0)
    torch.testing.assert_close(weight[0], torch.sigmoid(x).sum(), rtol=1e-14, atol=0)
    assert weight[1] == 0


@pytest.mark.parametrize("case", ["no_positives", "no_negatives", "all_ignored", "ties"])
def test_adversarial(case, device):
    g = generator(2)
    q = F.normalize(torch.randn(20, 4, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 3, (20,), generator=g)
    if case == "no_positives":
        labels = torch.arange(20)
    elif case == "no_negatives":
        labels = torch.zeros(20, dtype=torch.long)
    elif case == "all_ignored":
        labels = torch.full((20,), -1)
    else:  # ties: every row the same vector, so every similarity equals 1/tau
        q = q[:1].repeat(20, 1)
    p = dict(q=q.to(device), k=None, q_label=labels.to(device), k_label=None, q_group=None,
             k_group=None, exclude_self=True)
    lse = negatives_lse(p)
    weights = torch.randn(20, generator=g, dtype=torch.float64).to(device)
    ours = evaluate(ops.pair_softplus, p, lse, weights)
    exact = evaluate(reference.pair_softplus, p, lse, weights)
    for a, b in zip((ours[0], ours[1], *ours[2]), (exact[0], exact[1], *exact[2])):
        assert torch.isfinite(a).all()
        assert_close_scaled(a, b, 1e-10, case)
    if case != "ties":
        assert (ours[0] == 0).all() and all((gr == 0).all() for gr in ours[2])
    else:  # x = lse - s = log(#negatives): the value by hand
        negatives = (labels[:, None] != labels[None, :]).sum(1).double()
        positives = (labels[:, None] == labels[None, :]).sum(1).double() - 1
        want = torch.where(negatives > 0, positives * torch.log1p(negatives), 0.0)
        torch.testing.assert_close(ours[0].cpu(), want, rtol=1e-12, atol=1e-12)


def test_empty_rows():
    q, ql = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    total, weight = ops.pair_softplus(q, torch.randn(3, 4), ql, torch.zeros(3, dtype=torch.long),
                                      lse=torch.zeros(0), tau=0.1)
    assert total.shape == weight.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["tiles", "self_tiles"])
def test_low_precision(name, dtype, device):
    """float32 statistics, gradients in the input dtype; errors against float64 from the same
    input values (lse: the same float32 values) within the low-precision rule
    (conftest.assert_close_half_rule): every output is a sum of softplus / sigmoid terms, which
    move relative to themselves with their arguments (softplus >= sigmoid), so all are judged
    as relative results -- float32's epsilon for the float32 ones, ``dtype``'s for q's and k's
    gradients."""
    n, m, d, classes, options = CASES[name]
    p = problem(n, m, d, classes, dtype=dtype, device=device, **options)
    lse = negatives_lse(p)
    weights = torch.randn(n, generator=generator(3), dtype=torch.float64).to(device)
    ours = evaluate(ops.pair_softplus, p, lse, weights)
    assert ours[0].dtype == torch.float32 and ours[2][0].dtype == dtype
    up = {key: (v.double() if key in ("q", "k") and v is not None else v) for key, v in p.items()}
    exact = evaluate(reference.pair_softplus, up, lse.double(), weights)
    arg_error = float32_arg_error(similarity_span(p["q"], p["k"], TAU), n if m is None else m)
    for name_, a, b, result_dtype in zip(
            ("total", "weight", "grad q", "grad lse", "grad k"), (ours[0], ours[1], *ours[2]),
            (exact[0], exact[1], *exact[2]),
            (torch.float32, torch.float32, dtype, torch.float32, dtype)):
        assert_close_half_rule(a, b, result_dtype, name_, arg_error=arg_error)


GRADCHECK_CASES = {
    "general": lambda g: (torch.randn(6, 3, generator=g, dtype=torch.float64),
                          torch.randn(5, 3, generator=g, dtype=torch.float64),
                          torch.tensor([0, 1, 0, 2, 1, 5]), torch.tensor([1, 0, 0, 2, 1]),
                          None, None, {}),
    "general_groups": lambda g: (torch.randn(6, 4, generator=g, dtype=torch.float64),
                                 torch.randn(7, 4, generator=g, dtype=torch.float64),
                                 torch.tensor([0, 1, 0, 1, -1, 0]),
                                 torch.tensor([1, 0, 0, 1, 1, -1, 0]),
                                 torch.tensor([0, 0, 1, 1, 2, 3]),
                                 torch.tensor([0, 1, 0, 1, 0, 1, 3]), {}),
    "self": lambda g: (torch.randn(7, 3, generator=g, dtype=torch.float64), None,
                       torch.tensor([0, 1, 0, 2, 1, 1, -1]), None, None, None,
                       {"exclude_self": True}),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", sorted(GRADCHECK_CASES))
def test_gradcheck(case, seed):
    """Through q, k and lse, lse itself from pair_stats (so NT-Xent's whole chain)."""
    q, k, ql, kl, qg, kg, kw = GRADCHECK_CASES[case](generator(seed))
    q = F.normalize(q, dim=1).requires_grad_()
    k = None if k is None else F.normalize(k, dim=1).requires_grad_()

    def fn(*xs):
        kk = xs[1] if len(xs) > 1 else None
        lse, _, _ = ops.pair_stats(xs[0], kk, ql, kl, qg, kg, tau=0.3, denominator="negatives",
                                   **kw)
        total, _ = ops.pair_softplus(xs[0], kk, ql, kl, qg, kg, lse=lse, tau=0.3, **kw)
        return total

    assert torch.autograd.gradcheck(fn, (q,) if k is None else (q, k), eps=1e-6, atol=1e-6,
                                    rtol=1e-5)


@pytest.mark.parametrize("self_mode", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(self_mode, dtype):
    g = generator(4)
    q = torch.randn(11, 5, generator=g).to(dtype).requires_grad_()
    k = None if self_mode else torch.randn(13, 5, generator=g).to(dtype).requires_grad_()
    ql = torch.randint(-1, 3, (11,), generator=g)
    kl = None if self_mode else torch.randint(-1, 3, (13,), generator=g)
    lse, _, _ = ops.pair_stats(q.detach(), None if k is None else k.detach(), ql, kl, tau=0.1,
                               exclude_self=self_mode, denominator="negatives")
    args = (q, k, ql, kl, None, None, lse.requires_grad_(), 0.1, self_mode, -1)
    torch.library.opcheck(torch.ops.fastiml.pair_softplus.default, args)
    grad = torch.randn(11, generator=g)
    for needs in ((True, True), (True, False), (False, True)):
        bargs = (grad, q.detach(), None if k is None else k.detach(), ql, kl, None, None,
                 lse.detach(), 0.1, self_mode, -1, *needs)
        torch.library.opcheck(torch.ops.fastiml.pair_softplus_backward.default, bargs,
                              test_utils=("test_schema", "test_faketensor",
                                          "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    g = generator(5)
    q0 = torch.randn(70, 6, generator=g)
    labels = torch.randint(0, 4, (70,), generator=g)

    def loss_fn(q):
        qn = F.normalize(q, dim=1)
        lse, _, count = ops.pair_stats(qn, None, labels, None, tau=0.1, exclude_self=True,
                                       denominator="negatives")
        total, _ = ops.pair_softplus(qn, None, labels, None, lse=lse, tau=0.1, exclude_self=True)
        return total.sum() / count.sum()

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True, backend="aot_eager")):
        q = q0.clone().requires_grad_()
        loss = fn(q)
        results.append((loss.detach(), *torch.autograd.grad(loss, q)))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change,match", [
    (dict(lse=torch.zeros(5)), "lse must be a torch.float32 Tensor\\[6\\]"),
    (dict(lse=torch.zeros(6, dtype=torch.float64)), "lse must be a torch.float32"),
    (dict(lse=None), "lse must be"),
    (dict(tau=0.0), "tau"),
    (dict(ignore_index=True), "ignore_index must be an int"),
    (dict(q_label=torch.zeros(5, dtype=torch.long)), "q_label"),
    (dict(k=torch.randn(4, 3)), "k must have D=4 columns"),
])
def test_bad_inputs(change, match):
    args = dict(q=torch.randn(6, 4), k=torch.randn(4, 4), q_label=torch.zeros(6, dtype=torch.long),
                k_label=torch.zeros(4, dtype=torch.long), lse=torch.zeros(6), tau=0.1)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.pair_softplus(args.pop("q"), args.pop("k"), args.pop("q_label"),
                          args.pop("k_label"), **args)


def test_raw_op_checks_lse():
    q = torch.randn(6, 4)
    with pytest.raises(RuntimeError, match="pair_softplus: lse must be"):
        torch.ops.fastiml.pair_softplus(q, None, torch.zeros(6, dtype=torch.long), None, None,
                                        None, torch.zeros(3), 0.1, True, -1)
