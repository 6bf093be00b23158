"""row_lse (ops.row_lse; MoCo's memory bank, DESIGN 11): row log-sum-exps of scale * q k^T from
a forward that also forms the softmax-weighted mean of k, whose elementwise backward gives q's
and the scale's gradients without touching k. Held to the dense float64 formula
(reference.row_lse) in value and gradient on random and adversarial inputs: one pair, no keys,
partial tiles, logits of +-900, columns split among threads (few rows), half precision, a k
that takes a gradient (clip_lse's backward), gradcheck, opcheck, bad arguments.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import (assert_close_half_rule, assert_close_scaled, float32_arg_error, generator,
                      similarity_span)
from fastiml import ops, reference


def features(n, d, dtype, g, norm=1.0):
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return (norm * x).to(dtype)


def value_and_grads(fn, q, k, scale, weights, k_grad=False):
    """fn's lse weighed by `weights` and its gradients wrt (q, scale[, k])."""
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_(k_grad)
    scale = scale.detach().clone().requires_grad_()
    lse = fn(q, k, scale)
    finite = torch.isfinite(lse)
    leaves = [q, scale] + ([k] if k_grad else [])
    grads = torch.autograd.grad((lse[finite] * weights[finite]).sum(), leaves, allow_unused=True)
    return lse.detach(), [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]


def dense(q, k, scale):
    return reference.row_lse(q.double(), k.double(), scale.double())


CASES = {  # name: (N, M, D, feature norm, scale)
    "one pair": (1, 1, 3, 1.0, 10.0),
    "partial tiles": (300, 530, 16, 1.0, 14.3),
    "few rows, many keys": (37, 4400, 8, 1.0, 20.0),  # one row tile: columns split
    "logits of 900": (300, 530, 16, 3.0, 100.0),      # running maxima, no fixed shift
    "one key": (70, 1, 5, 1.0, 2.0),
}


@pytest.mark.parametrize("k_grad", [False, True], ids=["bank", "k takes grad"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
def test_row_lse_matches_dense(case, dtype, rel, k_grad):
    n, m, d, norm, s = CASES[case]
    g = generator(60)
    q, k = features(n, d, dtype, g, norm), features(m, d, dtype, g, norm)
    scale = torch.tensor(s, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    w = torch.randn(n, generator=g, dtype=torch.float64).to(scale.dtype)
    got, got_grads = value_and_grads(ops.row_lse, q, k, scale, w, k_grad)
    want, want_grads = value_and_grads(dense, q.double(), k.double(), scale.double(), w.double(),
                                       k_grad)
    assert got.dtype == scale.dtype and got.shape == (n,)
    # float32: the logits' own rounding, eps32 * scale * norm^2, dominates at scale 100.
    floor = 8 * torch.finfo(dtype).eps * s * norm * norm
    assert_close_scaled(got, want, rel, "lse", atol_floor=floor)
    for name, a, e in zip(("grad q", "grad scale", "grad k"), got_grads, want_grads):
        assert a.dtype == (dtype if name != "grad scale" else scale.dtype), name
        assert_close_scaled(a, e, rel, name, atol_floor=floor * (e.abs().max().item() + 1))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_row_lse_thread_counts(threads, num_threads):
    """Rows fewer than threads (one or two row tiles): the columns are split into parts whose
    states merge; every thread count matches the dense result and repeats bit for bit."""
    num_threads(threads)
    g = generator(61)
    q, k = features(300, 8, torch.float32, g), features(2000, 8, torch.float32, g)
    scale, w = torch.tensor(30.0), torch.randn(300, generator=g)
    first = value_and_grads(ops.row_lse, q, k, scale, w)
    second = value_and_grads(ops.row_lse, q, k, scale, w)
    assert torch.equal(first[0], second[0]) and all(map(torch.equal, first[1], second[1]))
    want = value_and_grads(dense, q.double(), k.double(), scale.double(), w.double())
    assert_close_scaled(first[0], want[0], 2e-5, "lse")
    for a, e in zip(first[1], want[1]):
        assert_close_scaled(a, e, 2e-5, "grads")


def test_row_lse_without_keys_is_neg_inf_with_zero_gradients():
    q = torch.randn(5, 4, requires_grad=True)
    scale = torch.tensor(3.0, requires_grad=True)
    lse = ops.row_lse(q, torch.empty(0, 4), scale)
    assert torch.isneginf(lse).all()
    # An upstream gradient of 1 on every row: a row without terms has gradient 0, not NaN.
    grad_q, grad_scale = torch.autograd.grad(lse, [q, scale], torch.ones_like(lse))
    assert torch.equal(grad_q, torch.zeros_like(q)) and float(grad_scale) == 0.0
    assert ops.row_lse(torch.empty(0, 4), torch.randn(3, 4), 1.0).shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_row_lse_half(dtype):
    """Half features, float32 accumulation: against float64 on the same (rounded) values by
    the suite's half rule."""
    g = generator(62)
    q, k = features(260, 32, dtype, g), features(700, 32, dtype, g)
    scale, w = torch.tensor(10.0), torch.randn(260, generator=g)
    got, (grad_q, grad_scale) = value_and_grads(ops.row_lse, q, k, scale, w)
    want, (want_q, want_scale) = value_and_grads(dense, q.double(), k.double(), scale.double(),
                                                 w.double())
    arg = float32_arg_error(similarity_span(q, k, 1 / 10.0), k.shape[0])
    # lse comes back in float32; the gradient in the half dtype.
    assert_close_half_rule(got, want, torch.float32, "lse", log_domain=True, arg_error=arg)
    assert grad_q.dtype == dtype
    assert_close_half_rule(grad_q, want_q, dtype, "grad q", arg_error=arg)
    assert abs(float(grad_scale) - float(want_scale)) <= 1e-3 * (abs(float(want_scale)) + 1)


def test_row_lse_backward_does_not_read_k():
    """The bank path saves the mean, not k: k may be overwritten before the backward."""
    g = generator(63)
    q = features(40, 6, torch.float64, g).requires_grad_()
    k = features(90, 6, torch.float64, g)
    lse = ops.row_lse(q, k, 5.0)
    (want,) = torch.autograd.grad(dense(q, k, torch.tensor(5.0)).sum(), [q])
    k.mul_(-3.0)  # a FIFO update of the bank between forward and backward
    (got,) = torch.autograd.grad(lse.sum(), [q])
    assert_close_scaled(got, want, 1e-12, "grad q")


def test_row_lse_gradcheck():
    g = generator(64)
    q = features(6, 4, torch.float64, g).requires_grad_()
    k = features(9, 4, torch.float64, g)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, t: ops.row_lse(q, k, t), (q, scale),
                                    eps=1e-6, atol=1e-7, rtol=1e-6)
    assert torch.autograd.gradcheck(lambda q, k, t: ops.row_lse(q, k, t),
                                    (q, k.clone().requires_grad_(), scale),
                                    eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_mean", [False, True])
def test_row_lse_opcheck(dtype, with_mean):
    g = generator(65)
    q, k = torch.randn(11, 5, generator=g).to(dtype), torch.randn(13, 5, generator=g).to(dtype)
    torch.library.opcheck(torch.ops.fastiml.row_lse.default,
                          (q, k, torch.tensor(2.0), with_mean),
                          test_utils=("test_schema", "test_faketensor"))
    lse, mean = torch.ops.fastiml.row_lse(q, k, torch.tensor(2.0), with_mean)
    assert mean.shape == ((11, 5) if with_mean else (0,))
    if with_mean:
        p = torch.softmax(2.0 * q.double() @ k.double().t(), 1)
        torch.testing.assert_close(mean.double(), p @ k.double(), rtol=1e-5, atol=1e-6)


def test_row_lse_bad_arguments():
    q = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"k must be \[M, 3\]"):
        ops.row_lse(q, torch.randn(4, 2), 1.0)
    with pytest.raises(ValueError, match=r"k must be \[M, 3\] with q's dtype"):
        ops.row_lse(q, q.double(), 1.0)
    with pytest.raises(ValueError, match="scale must hold one value"):
        ops.row_lse(q, q, torch.ones(2))
    with pytest.raises(ValueError, match="scale must be finite"):
        ops.row_lse(q, q, float("nan"))
    with pytest.raises(RuntimeError, match="scale must be a 0-dim Float"):  # the op's own check
        torch.ops.fastiml.row_lse(q, q, torch.tensor(1.0, dtype=torch.float64), True)


def test_row_lse_and_the_bank_loss_compile_fullgraph():
    """ops.row_lse (an autograd.Function around the custom op) and lightly's bank loss on it
    under torch.compile(fullgraph=True): the values and the gradients of eager mode."""
    from fastiml.losses.lightly import bank_loss
    torch._dynamo.reset()
    g = generator(66)
    q0, k = features(40, 6, torch.float32, g), features(300, 6, torch.float32, g)
    out1 = features(40, 6, torch.float32, g)

    def step(q, scale):
        return ops.row_lse(q, k, scale).sum() + bank_loss(q, out1, k, 0.2).mean()

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        q, scale = q0.clone().requires_grad_(), torch.tensor(7.0, requires_grad=True)
        value = fn(q, scale)
        results.append((value.detach(), *torch.autograd.grad(value, [q, scale])))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_row_lse_forms_the_mean_only_when_a_gradient_will_need_it(monkeypatch):
    """Inference (no_grad, or no input requiring grad) and a k that takes the gradient skip
    the mean's product; q or the scale requiring grad (k not) forms it."""
    calls = []
    real = torch.ops.fastiml.row_lse

    class Recorder:
        def __call__(self, q, k, scale, with_mean):
            calls.append(with_mean)
            return real(q, k, scale, with_mean)

    monkeypatch.setattr(torch.ops.fastiml, "row_lse", Recorder())
    q, k = torch.randn(5, 3), torch.randn(7, 3)
    ops.row_lse(q, k, 2.0)
    with torch.no_grad():
        ops.row_lse(q.requires_grad_(), k, 2.0)
    ops.row_lse(q.detach(), k.requires_grad_(), 2.0)
    ops.row_lse(q.detach().requires_grad_(), k.detach(), 2.0)
    ops.row_lse(q.detach(), k.detach(), torch.tensor(2.0, requires_grad=True))
    assert calls == [False, False, False, True, True]
