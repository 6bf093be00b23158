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

from fastiml.losses import NCLLoss

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


def worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        tensors, mask, valid = make_batch()
        half = slice(2 * rank, 2 * rank + 2)
        results = {name: loss_and_grads([t[half] for t in tensors], mask[half], valid[half],
                                        options) for name, options in OPTIONS.items()}
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
