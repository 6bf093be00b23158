"""fastiml.losses.pml.NTXentLoss against pytorch-metric-learning's own NTXentLoss (values and
gradients, float32 / float64, with and without ref_emb), against an independent float64 formula
(``fastiml.reference.ntxent_loss``), and inside pml's own test file: with a
pytorch-metric-learning checkout at $FASTIML_PML_REPO, its ``tests/losses/test_ntxent_loss.py``
runs with fastiml's NTXentLoss and SupConLoss standing in for pml's wherever the distance (and
the reducer) is the default one.
"""
import importlib
import os
import shutil
import sys
import unittest

import pytest
import torch

from conftest import assert_close_scaled, generator
from fastiml import reference
from fastiml.losses import pml as fpml

REL = 1e-5


@pytest.fixture(scope="module")
def pml_losses():
    return pytest.importorskip("pytorch_metric_learning.losses")


def value_and_grads(fn, *inputs):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    loss = fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves)


def assert_same(ours, theirs, rtol=REL, name=""):
    assert_close_scaled(ours[0], theirs[0], rtol, f"{name} loss")
    for i, (a, b) in enumerate(zip(ours[1], theirs[1])):
        assert torch.isfinite(a).all()
        assert_close_scaled(a, b, rtol, f"{name} grad {i}")


def simclr_labels(pairs):
    """Two views of each of ``pairs`` samples: the SimCLR batch."""
    return torch.arange(pairs).repeat(2)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
@pytest.mark.parametrize("labels", ["classes", "simclr", "singletons_too"])
@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_pml(dtype, with_ref, labels, temperature, pml_losses):
    g = generator(40)
    # pml holds a [positive pairs x negative pairs] matrix (and temporaries like it): few rows
    # with few classes; the SimCLR case (one positive each) crosses a 256-row tile.
    n = 260 if labels == "simclr" else 60
    emb = torch.randn(n, 16, generator=g, dtype=torch.float64).to(dtype) * 3
    lab = {"classes": torch.randint(0, 6, (n,), generator=g), "simclr": simclr_labels(n // 2),
           "singletons_too": torch.cat([torch.randint(0, 3, (n - 20,), generator=g),
                                        torch.arange(100, 120)])}[labels]
    ours, theirs = fpml.NTXentLoss(temperature), pml_losses.NTXentLoss(temperature)
    if with_ref:
        ref = torch.randn(45, 16, generator=g, dtype=torch.float64).to(dtype)
        ref_lab = torch.randint(0, 7, (45,), generator=g)
        a = value_and_grads(lambda e, r: ours(e, lab, ref_emb=r, ref_labels=ref_lab), emb, ref)
        b = value_and_grads(lambda e, r: theirs(e, lab, ref_emb=r, ref_labels=ref_lab), emb, ref)
    else:
        a = value_and_grads(lambda e: ours(e, lab), emb)
        b = value_and_grads(lambda e: theirs(e, lab), emb)
    assert a[0].dtype == dtype and a[0].item() > 0
    assert_same(a, b, name=f"{labels}")


@pytest.mark.parametrize("with_ref", [False, True])
def test_matches_dense_float64(with_ref):
    """An independent formula (materialised), float64 to 1e-10; some anchors have no
    negative (the ref set has one label only for part of the rows)."""
    g = generator(41)
    emb = torch.randn(30, 5, generator=g, dtype=torch.float64)
    lab = torch.randint(0, 3, (30,), generator=g)
    if with_ref:
        ref = torch.randn(12, 5, generator=g, dtype=torch.float64)
        ref_lab = torch.cat([torch.zeros(11, dtype=torch.long), torch.tensor([1])])
        a = value_and_grads(lambda e, r: fpml.NTXentLoss(0.2)(e, lab, ref_emb=r,
                                                               ref_labels=ref_lab), emb, ref)
        b = value_and_grads(lambda e, r: reference.ntxent_loss(e, lab, r, ref_lab, 0.2), emb,
                            ref)
    else:
        a = value_and_grads(lambda e: fpml.NTXentLoss(0.2)(e, lab), emb)
        b = value_and_grads(lambda e: reference.ntxent_loss(e, lab, temperature=0.2), emb)
    assert_same(a, b, rtol=1e-10)


@pytest.mark.parametrize("case", ["one_label", "no_positive_pair", "one_embedding",
                                  "one_pos_one_neg", "ref_one_label"])
def test_zero_loss_is_connected(case, pml_losses):
    """No positive or no negative pair (or pml's "at most one of each"): 0 like pml, with the
    zero still in the graph."""
    g = generator(42)
    emb = torch.randn(8, 4, generator=g)
    kwargs, leaves = {}, [emb]
    lab = {"one_label": torch.zeros(8, dtype=torch.long), "no_positive_pair": torch.arange(8),
           "one_embedding": torch.zeros(1, dtype=torch.long),
           "one_pos_one_neg": torch.tensor([0]), "ref_one_label": torch.full((8,), 3)}[case]
    if case == "one_embedding":
        emb = emb[:1]
    elif case == "one_pos_one_neg":
        emb = emb[:1]
        kwargs = dict(ref_emb=torch.randn(2, 4, generator=g), ref_labels=torch.tensor([0, 1]))
    elif case == "ref_one_label":
        kwargs = dict(ref_emb=torch.randn(5, 4, generator=g), ref_labels=torch.full((5,), 3))
    leaves = [emb.requires_grad_()] + ([kwargs["ref_emb"].requires_grad_()] if kwargs else [])
    loss = fpml.NTXentLoss()(emb, lab, **kwargs)
    assert loss.detach().item() == 0.0 == float(pml_losses.NTXentLoss()(emb, lab, **kwargs).detach())
    assert loss.requires_grad
    for grad in torch.autograd.grad(loss, leaves):
        assert (grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_embeddings_give_float32_loss(dtype):
    g = generator(43)
    emb = torch.randn(64, 16, generator=g).to(dtype)
    lab = simclr_labels(32)
    loss, (grad,) = value_and_grads(lambda e: fpml.NTXentLoss()(e, lab), emb)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    exact = reference.ntxent_loss(emb.double(), lab)
    assert abs(loss.item() - exact.item()) <= 2e-3 * exact.item()


def test_is_a_drop_in(pml_losses):
    assert fpml.NTXentLoss().temperature == pml_losses.NTXentLoss().temperature == 0.07
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.reducers import MeanReducer
    fpml.NTXentLoss(0.1, distance=CosineSimilarity(), reducer=MeanReducer())  # the defaults


def test_unsupported_options_are_named(pml_losses):
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.reducers import AvgNonZeroReducer
    with pytest.raises(ValueError, match="distance=LpDistance"):
        fpml.NTXentLoss(distance=LpDistance())
    with pytest.raises(ValueError, match="reducer=AvgNonZeroReducer"):
        fpml.NTXentLoss(reducer=AvgNonZeroReducer())
    with pytest.raises(ValueError, match="embedding_regularizer"):
        fpml.NTXentLoss(embedding_regularizer=object())
    emb, lab = torch.randn(6, 4), torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="indices_tuple"):
        fpml.NTXentLoss()(emb, lab, indices_tuple=(lab, lab, lab))
    with pytest.raises(ValueError, match="labels"):
        fpml.NTXentLoss()(emb)
    with pytest.raises(ValueError, match="ref_emb and ref_labels"):
        fpml.NTXentLoss()(emb, lab, ref_emb=torch.randn(3, 4))
    with pytest.raises(ValueError, match="temperature"):
        fpml.NTXentLoss(temperature=0)


# ------------------------------------------------------------------- pml's own test file

def stand_ins(pml_class, ours_class, calls):
    """pml's class, except where its defaults (cosine distance, default reducer) are asked
    for: then fastiml's, counted in ``calls``."""
    def make(*args, **kwargs):
        if "distance" in kwargs or "reducer" in kwargs:
            return pml_class(*args, **kwargs)
        calls.append(ours_class.__name__)
        return ours_class(*args, **kwargs)
    return make


def test_pml_own_ntxent_tests_pass_with_fastiml(tmp_path, monkeypatch, pml_losses):
    """pml's tests/losses/test_ntxent_loss.py (float32, float64, CPU), with fastiml's
    NTXentLoss and SupConLoss in place of pml's for every cosine-distance case."""
    repo = os.environ.get("FASTIML_PML_REPO")
    if not repo or not os.path.isfile(os.path.join(repo, "tests", "losses",
                                                   "test_ntxent_loss.py")):
        pytest.skip("set FASTIML_PML_REPO to a pytorch-metric-learning checkout to run its tests")
    shutil.copytree(os.path.join(repo, "tests"), tmp_path / "pml_tests")
    monkeypatch.setenv("TEST_DTYPES", "float32,float64")
    monkeypatch.setenv("TEST_DEVICE", "cpu")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        module = importlib.import_module("pml_tests.losses.test_ntxent_loss")
        calls = []
        module.NTXentLoss = stand_ins(pml_losses.NTXentLoss, fpml.NTXentLoss, calls)
        module.SupConLoss = stand_ins(pml_losses.SupConLoss, fpml.SupConLoss, calls)
        suite = unittest.defaultTestLoader.loadTestsFromModule(module)
        result = unittest.TextTestRunner(verbosity=0).run(suite)
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] == "pml_tests"]:
            del sys.modules[name]
    assert result.testsRun >= 4 and result.wasSuccessful(), (result.failures, result.errors)
    assert {"NTXentLoss", "SupConLoss"} <= set(calls)
