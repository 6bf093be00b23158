"""Cross-rank contrast: two gloo processes on loopback must reproduce one process on the union.

Each rank holds half of the batch and computes NCLLoss with columns gathered from both ranks.
Under DDP the gradients are averaged over ranks, so the per-rank gradients divided by the world
size must equal the single-process gradients of that rank's slice, and the mean of the ranks'
losses must equal the single-process loss.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastiml.losses import NCLLoss, sigmoid_focal_loss
from fastiml.losses.ncl import masked_bce

WORLD = 2


def make_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, d, h, w = 4, 8, 6, 7
    proj_a = torch.randn(b, d, h, w, generator=g, dtype=torch.float64)
    proj_b = torch.randn(b, d, h, w, generator=g, dtype=torch.float64)
    logit_a = torch.randn(b, 1, 4 * h, 4 * w, generator=g, dtype=torch.float64)
    logit_b = torch.randn(b, 1, 4 * h, 4 * w, generator=g, dtype=torch.float64)
    mask = torch.zeros(b, 4 * h, 4 * w)
    for i in range(b):  # a different rectangle per image, so patches mix classes
        mask[i, 2 + i: 13 + 2 * i, 3 * i: 9 + 3 * i] = 1
    valid = torch.ones(b, 4 * h, 4 * w, dtype=torch.bool)
    valid[1, :, -5:] = False  # ranks differ in valid pixels: the reduction must account for it
    return [proj_a, proj_b, logit_a, logit_b], mask, valid


def loss_and_grads(tensors, mask, valid, options):
    tensors = [t.clone().requires_grad_() for t in tensors]
    total, _ = NCLLoss(patch=2, **options)(*tensors, mask, valid)
    grads = torch.autograd.grad(total, tensors)
    return total.detach(), grads


OPTIONS = {"batch": {}, "within_image": {"within_image": True}, "weight_other": {"weight_other": 0.5}}


def pixel_mean_losses():
    """The per-pixel losses of the bce and mpc methods: (name, fn(logit, mask, valid, gather))."""
    return [("masked_bce", lambda x, m, v, g: masked_bce(x[:, 0], m, v, gather=g)),
            ("focal", lambda x, m, v, g: sigmoid_focal_loss(x[:, 0], m, valid=v, gather=g))]


def pixel_losses(rank=None):
    """Each pixel-mean loss and its logit gradient, on this rank's half (all of it: None)."""
    (_, _, logit, _), mask, valid = make_batch()
    half = slice(None) if rank is None else slice(2 * rank, 2 * rank + 2)
    out = {}
    for name, fn in pixel_mean_losses():
        x = logit[half].clone().requires_grad_()
        loss = fn(x, mask[half], valid[half], True)
        out[name] = (loss.detach(), torch.autograd.grad(loss, x)[0])
    return out


def worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        tensors, mask, valid = make_batch()
        half = slice(2 * rank, 2 * rank + 2)
        results = {name: loss_and_grads([t[half] for t in tensors], mask[half], valid[half],
                                        options) for name, options in OPTIONS.items()}
        results.update(pixel_losses(rank))
        results["no_gather"] = loss_and_grads([t[half] for t in tensors], mask[half], valid[half],
                                              {"gather_across_ranks": False})
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", list(OPTIONS))
def test_two_ranks_equal_one_process(rank_results, name):
    tensors, mask, valid = make_batch()
    total, grads = loss_and_grads(tensors, mask, valid, OPTIONS[name])
    # The BCE and pivot terms are computed in float32 by design: float32 tolerances.
    mean_total = sum(r[name][0] for r in rank_results) / WORLD
    torch.testing.assert_close(mean_total, total, rtol=1e-6, atol=1e-7)
    for rank, result in enumerate(rank_results):
        half = slice(2 * rank, 2 * rank + 2)
        for got, want in zip(result[name][1], grads):
            torch.testing.assert_close(got / WORLD, want[half], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", [n for n, _ in pixel_mean_losses()])
def test_pixel_means_are_exact_with_unequal_valid_counts(rank_results, name):
    """bce's and MPC's focal loss: the ranks hold different numbers of valid pixels (padding),
    yet the mean of the ranks' losses and the DDP-averaged gradient equal one process's on the
    union (each rank divides by the valid pixels of all ranks)."""
    _, mask, valid = make_batch()
    counts = [int(valid[2 * r: 2 * r + 2].sum()) for r in range(WORLD)]
    assert counts[0] != counts[1]
    total, grad = pixel_losses()[name]
    mean_total = sum(r[name][0] for r in rank_results) / WORLD
    torch.testing.assert_close(mean_total, total, rtol=1e-6, atol=1e-7)
    for rank, result in enumerate(rank_results):
        half = slice(2 * rank, 2 * rank + 2)
        torch.testing.assert_close(result[name][1] / WORLD, grad[half], rtol=1e-5, atol=1e-9)


def test_without_gather_ranks_see_only_their_half(rank_results):
    """Inside the process group, ``gather_across_ranks=False`` makes each rank's loss that of its
    own half alone (computed here in one process), not the cross-rank one."""
    tensors, mask, valid = make_batch()
    for rank, result in enumerate(rank_results):
        half = slice(2 * rank, 2 * rank + 2)
        alone, alone_grads = loss_and_grads([t[half] for t in tensors], mask[half], valid[half],
                                            {})
        got, got_grads = result["no_gather"]
        torch.testing.assert_close(got, alone, rtol=1e-6, atol=1e-7)
        for g, want in zip(got_grads, alone_grads):
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(result["batch"][0], got, rtol=1e-3)  # gathering does matter
