"""fastiml.metrics against scikit-learn, image by image, then averaged as documented."""
import math
import os
import socket

import numpy as np
import pytest
import torch

from fastiml.metrics import IMLMetrics, best_f1, per_image_metrics, roc_auc

sk = pytest.importorskip("sklearn.metrics")


def _sk_image(p, y, thr):
    """Reference per-image metrics from scikit-learn on flat numpy arrays (valid pixels only)."""
    pred = p > thr
    prec, rec, _ = sk.precision_recall_curve(y, p)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1s = np.where(prec + rec > 0, 2 * prec * rec / (prec + rec), 0.0)
    return {
        "f1": sk.f1_score(y, pred, zero_division=0),
        "iou": sk.jaccard_score(y, pred, zero_division=0),
        "precision": sk.precision_score(y, pred, zero_division=0),
        "recall": sk.recall_score(y, pred, zero_division=0),
        "f1_permuted": max(sk.f1_score(y, pred, zero_division=0),
                           sk.f1_score(y, (1 - p) > thr, zero_division=0)),
        "f1_best": float(np.max(f1s)),
        "auc": sk.roc_auc_score(y, p) if 0 < y.sum() < y.size else math.nan,
    }


def _random_batch(rng, b=12, h=17, w=23, quantise=None, with_valid=True):
    """Probability maps correlated with random blob masks; some images authentic, some with ties."""
    masks = np.zeros((b, h, w), np.float32)
    probs = np.empty((b, h, w), np.float32)
    valid = np.ones((b, h, w), bool)
    for i in range(b):
        if i % 4 != 3:  # every fourth image authentic
            y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
            masks[i, y0:y0 + rng.integers(2, h - y0), x0:x0 + rng.integers(2, w - x0)] = 1
        noise = rng.uniform(0, 1, (h, w))
        probs[i] = np.clip(0.55 * masks[i] + 0.6 * noise, 0, 1)
        if with_valid and i % 3 == 1:  # a padded image: only the top-left part is real
            valid[i, :, w // 2:] = False
            valid[i, h - 3:, :] = False
    if quantise:
        probs = np.round(probs * quantise) / quantise  # many exact ties
    # A tampered image whose valid region hides all its positives becomes authentic: that is fine.
    return torch.from_numpy(probs), torch.from_numpy(masks), torch.from_numpy(valid)


def _reference(probs, masks, valid, thr):
    per = {k: [] for k in ("f1", "iou", "precision", "recall", "f1_permuted", "f1_best", "auc")}
    scores, labels = [], []
    for p, m, v in zip(probs.numpy(), masks.numpy(), valid.numpy()):
        pv, yv = p[v], m[v].astype(int)
        if pv.size == 0:
            continue
        scores.append(pv.max())
        labels.append(int(yv.any()))
        if yv.any():
            for k, val in _sk_image(pv, yv, thr).items():
                per[k].append(val)
    ref = {f"pixel_{k}": float(np.nanmean(v)) for k, v in per.items()}
    scores, labels = np.array(scores), np.array(labels)
    ref["image_acc"] = sk.accuracy_score(labels, scores > thr)
    ref["image_auc"] = sk.roc_auc_score(labels, scores)
    ref["n_tampered"] = int(labels.sum())
    ref["n_authentic"] = int((1 - labels).sum())
    return ref


@pytest.mark.parametrize("quantise", [None, 10, 3])
@pytest.mark.parametrize("thr", [0.5, 0.3])
def test_matches_sklearn(quantise, thr):
    rng = np.random.default_rng(7 + (quantise or 0))
    probs, masks, valid = _random_batch(rng, quantise=quantise)
    m = IMLMetrics(threshold=thr)
    # Stream in uneven batches and with the [B, 1, H, W] layout to exercise both input forms.
    m.update(probs[:5, None], masks[:5, None], valid[:5, None])
    m.update(probs[5:], masks[5:], valid[5:])
    got = m.compute()
    ref = _reference(probs, masks, valid, thr)
    assert set(got) == {"pixel_f1", "pixel_iou", "pixel_precision", "pixel_recall", "pixel_f1_best",
                        "pixel_f1_permuted", "pixel_auc", "image_auc", "image_acc", "n_tampered",
                        "n_authentic"}
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k
    assert 0 < got["n_authentic"] and 0 < got["n_tampered"]


def test_valid_mask_changes_result():
    """Invalid pixels must really be excluded: a confident wrong prediction there costs nothing."""
    mask = torch.zeros(1, 8, 8)
    mask[0, :4, :4] = 1
    prob = mask.clone()
    prob[0, 6:, 6:] = 1.0  # false positives in what will be padding
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    valid[0, 6:, :] = False
    a, b = IMLMetrics(), IMLMetrics()
    a.update(prob, mask)
    b.update(prob, mask, valid)
    assert a.compute()["pixel_f1"] < 1.0
    assert b.compute()["pixel_f1"] == 1.0


def test_edge_cases():
    m = IMLMetrics()
    mask = torch.zeros(2, 4, 4)
    mask[0, 0, 0] = 1
    prob = torch.zeros(2, 4, 4)  # predicts nothing: F1 = precision = 0 (zero_division=0)
    m.update(prob, mask)
    r = m.compute()
    assert r["pixel_f1"] == 0.0 and r["pixel_precision"] == 0.0 and r["pixel_recall"] == 0.0
    assert r["pixel_f1_permuted"] == pytest.approx(2 / 17)  # 1 - p predicts everything
    assert r["pixel_auc"] == 0.5  # all tied
    assert r["n_tampered"] == 1 and r["n_authentic"] == 1
    assert r["image_acc"] == 0.5 and r["image_auc"] == 0.5

    # Only authentic images: pixel metrics and image AUC undefined -> None.
    m = IMLMetrics()
    m.update(torch.rand(3, 5, 5), torch.zeros(3, 5, 5))
    r = m.compute()
    assert r["pixel_f1"] is None and r["pixel_auc"] is None and r["image_auc"] is None
    assert r["n_authentic"] == 3 and r["n_tampered"] == 0

    # A fully tampered image has no pixel AUC but still counts for F1.
    d = per_image_metrics(torch.full((3, 3), 0.9), torch.ones(3, 3))
    assert math.isnan(d["auc"]) and d["f1"] == 1.0
    # No valid pixel: ignored.
    assert per_image_metrics(torch.rand(3, 3), torch.ones(3, 3), torch.zeros(3, 3, dtype=torch.bool)) is None

    # Nothing seen at all.
    r = IMLMetrics().compute()
    assert r["image_acc"] is None and r["n_tampered"] == 0


def test_helpers_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 300))
        s = np.round(rng.uniform(0, 1, n) * rng.integers(1, 20)) / 20
        y = rng.integers(0, 2, n)
        if 0 < y.sum() < n:
            assert roc_auc(torch.from_numpy(s), torch.from_numpy(y)) == pytest.approx(sk.roc_auc_score(y, s))
        if y.sum() > 0:
            p, r, _ = sk.precision_recall_curve(y, s)
            ref = np.max(np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0))
            assert best_f1(torch.from_numpy(s), torch.from_numpy(y)) == pytest.approx(ref)


def test_bad_inputs():
    m = IMLMetrics()
    with pytest.raises(ValueError, match="prob must hold probabilities"):
        m.update(torch.randn(1, 4, 4) * 5, torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"mask must hold values in \{0, 1\}"):
        m.update(torch.rand(1, 4, 4), torch.full((1, 4, 4), 255.0))
    with pytest.raises(ValueError, match="mask must have the shape of prob"):
        m.update(torch.rand(1, 4, 4), torch.zeros(1, 4, 5))
    with pytest.raises(ValueError, match=r"prob must be a Tensor \[B, 1, H, W\]"):
        m.update(torch.rand(4, 4), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="valid must be a bool"):
        m.update(torch.rand(1, 4, 4), torch.zeros(1, 4, 4), torch.ones(1, 4, 4))
    with pytest.raises(ValueError, match="threshold"):
        IMLMetrics(threshold=2)
    assert m.compute()["n_tampered"] == 0  # failed updates left nothing behind


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, probs, masks, valid, out):
    import datetime

    import torch.distributed as dist
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        m = IMLMetrics()
        m.update(probs[rank::world], masks[rank::world], valid[rank::world])
        torch.save(m.compute(), os.path.join(out, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ddp_gathers_all_ranks(tmp_path):
    """Two gloo processes, each seeing half the images, both report the metrics of all of them."""
    import torch.multiprocessing as mp

    probs, masks, valid = _random_batch(np.random.default_rng(3), b=10)
    single = IMLMetrics()
    single.update(probs, masks, valid)
    expected = single.compute()
    # fork: the children need not re-import torch and scikit-learn (seconds on this machine).
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_ddp_worker, args=(2, _free_port(), probs, masks, valid, str(tmp_path)),
                       nprocs=2, start_method=method)
    for rank in range(2):
        got = torch.load(tmp_path / f"r{rank}.pt")
        for k, v in expected.items():
            assert got[k] == pytest.approx(v, abs=1e-12), (rank, k)
