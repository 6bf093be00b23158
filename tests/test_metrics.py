"""fastiml.metrics against scikit-learn, image by image, then averaged as documented."""
import math
import os
import socket

import numpy as np
import pytest
import torch

from fastiml.metrics import IMLMetrics, best_f1, image_scores, per_image_metrics, roc_auc

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


def _np_image_scores(pv, thr, topk):
    """Image scores of one image's valid probabilities, in numpy (the module's definitions)."""
    pv = np.sort(pv.astype(np.float64))[::-1]

    def top(k):
        return pv[:max(1, int(np.ceil(round(k * pv.size, 6))))].mean()

    lower_half = pv[pv.size // 2:].mean()
    out = {"max": pv[0], "topk": top(topk), "area": np.mean(pv > thr), "mean": pv.mean(),
           "weighted": (pv ** 2).sum() / pv.sum(), "contrast": top(topk) - lower_half}
    for k in ("0.001", "0.01", "0.05", "0.2"):
        out[f"topk@{k}"] = top(float(k))
        out[f"contrast@{k}"] = top(float(k)) - lower_half
    return out


def _reference(probs, masks, valid, thr, topk=0.01):
    per = {k: [] for k in ("f1", "iou", "precision", "recall", "f1_permuted", "f1_best", "auc")}
    scores, labels, all_scores = [], [], []
    for p, m, v in zip(probs.numpy(), masks.numpy(), valid.numpy()):
        pv, yv = p[v], m[v].astype(int)
        if pv.size == 0:
            continue
        scores.append(pv.max())
        all_scores.append(_np_image_scores(pv, thr, topk))
        labels.append(int(yv.any()))
        if yv.any():
            for k, val in _sk_image(pv, yv, thr).items():
                per[k].append(val)
    ref = {f"pixel_{k}": float(np.nanmean(v)) for k, v in per.items()}
    scores, labels = np.array(scores), np.array(labels)
    ref["image_acc"] = sk.accuracy_score(labels, scores > thr)
    ref["image_auc"] = sk.roc_auc_score(labels, scores)
    ref["image_auc_by_score"] = {name: sk.roc_auc_score(labels, [s[name] for s in all_scores])
                                 for name in all_scores[0]}
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
                        "pixel_f1_permuted", "pixel_auc", "image_auc", "image_acc", "image_score",
                        "image_auc_by_score", "n_tampered", "n_authentic"}
    assert got["image_score"] == "max"
    by_score = ref.pop("image_auc_by_score")
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k
    assert set(got["image_auc_by_score"]) == set(by_score)
    for name, v in by_score.items():  # every score's AUC, from the same pass
        assert got["image_auc_by_score"][name] == pytest.approx(v, abs=1e-9), name
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


# ---------------------------------------------------------------------------------- image scores
def _hand_map():
    """A 2 x 4 map whose two invalid pixels hold the highest probabilities (1.0): valid values
    0.75, 0.625, 0.5, 0.5 (a tie, equal to the threshold 0.5), 0.25, 0.0 (exact in binary)."""
    prob = torch.tensor([[[1.0, 0.75, 0.5, 0.5], [0.25, 0.0, 1.0, 0.625]]])
    valid = torch.tensor([[[False, True, True, True], [True, True, False, True]]])
    return prob, valid


@pytest.mark.parametrize("k, expected", [
    (0.5, (0.75 + 0.625 + 0.5) / 3),  # 3 of 6 pixels; one of the tied 0.5s
    (4 / 6, (0.75 + 0.625 + 0.5 + 0.5) / 4),  # both tied pixels
    (0.3, (0.75 + 0.625) / 2),  # 1.8 pixels -> 2
    (0.01, 0.75),  # 0.06 pixels -> at least 1: the max of the valid pixels, not the invalid 1.0
    (1.0, 2.625 / 6),  # every valid pixel: the mean
    (1e-12, 0.75),  # k * n rounds to no pixel: still one
])
def test_topk_by_hand(k, expected):
    prob, valid = _hand_map()
    r = per_image_metrics(prob[0], torch.zeros(2, 4), valid[0], 0.5, image_score="topk", image_topk=k)
    assert r["score"] == pytest.approx(expected, abs=1e-12)
    assert r["scores"]["topk"] == r["score"]


def test_other_scores_by_hand():
    prob, valid = _hand_map()
    s = per_image_metrics(prob[0], torch.zeros(2, 4), valid[0], 0.5)["scores"]
    assert s["max"] == 0.75  # the invalid 1.0s are not seen
    assert s["area"] == pytest.approx(2 / 6)  # > 0.5 strictly: the two 0.5s do not count
    assert s["mean"] == pytest.approx(2.625 / 6)
    assert s["weighted"] == pytest.approx(97 / 168)  # (sum p^2 = 97/64) / (sum p = 21/8)
    assert s["topk@0.2"] == pytest.approx((0.75 + 0.625) / 2)  # ceil(1.2) = 2 pixels
    # Top 1 % (one pixel) minus the lower half (0.5, 0.25, 0.0: a tied 0.5 on either side).
    assert s["contrast"] == pytest.approx(0.75 - 0.75 / 3)
    assert s["contrast@0.2"] == pytest.approx((0.75 + 0.625) / 2 - 0.75 / 3)
    odd = image_scores(torch.tensor([0.5, 1.0, 0.0, 0.25, 0.75]), image_topk=0.2)
    assert odd["contrast"] == pytest.approx(1.0 - 0.75 / 3)  # lower half: 0.25, 0.0 and the median 0.5
    assert image_scores(torch.tensor([0.9]))["contrast"] == 0.0  # one pixel: nothing stands out
    assert per_image_metrics(prob[0], torch.zeros(2, 4), valid[0], 0.25)["scores"]["area"] == pytest.approx(4 / 6)
    zero = image_scores(torch.zeros(5))
    assert zero["weighted"] == 0.0 and zero["area"] == 0.0 and zero["topk"] == 0.0


def test_topk_count_exact_product():
    """k * n that is an integer in exact arithmetic selects exactly that many pixels, though
    0.07 * 100 is 7.000000000000001 in floating point."""
    p = torch.zeros(100, dtype=torch.float64)
    p[:7] = 1.0
    assert image_scores(p, image_topk=0.07)["topk"] == 1.0  # 7 pixels, not 8


def test_all_invalid_image_ignored_by_every_score():
    m = IMLMetrics(image_score="topk", image_topk=0.5)
    prob = torch.tensor([[[0.9, 0.9]], [[0.2, 0.1]], [[0.8, 0.7]]])
    mask = torch.tensor([[[0.0, 0.0]], [[0.0, 0.0]], [[1.0, 0.0]]])
    valid = torch.tensor([[[False, False]], [[True, True]], [[True, True]]])
    m.update(prob, mask, valid)
    r = m.compute()
    assert r["n_authentic"] == 1 and r["n_tampered"] == 1  # the all-invalid image is not counted
    assert all(v == 1.0 for v in r["image_auc_by_score"].values())


def _images_max_cannot_separate():
    """Two authentic maps with one stray confident pixel, two forged ones with a confident
    region whose peak is lower: the max ranks them backwards, a top-k mean forwards."""
    prob = torch.zeros(4, 10, 10)
    mask = torch.zeros(4, 10, 10)
    prob[0, 0, 0], prob[1, 5, 5] = 1.0, 0.95  # authentic
    for i, peak in ((2, 0.9), (3, 0.85)):
        mask[i, :5] = 1
        prob[i, :5] = peak
    return prob, mask


def test_image_auc_follows_the_chosen_score():
    prob, mask = _images_max_cannot_separate()
    got = {}
    for name in ("max", "topk", "area", "mean", "weighted", "contrast"):
        m = IMLMetrics(image_score=name, image_topk=0.1)
        m.update(prob, mask)
        got[name] = m.compute()
        assert got[name]["image_score"] == name
        assert got[name]["image_auc"] == got[name]["image_auc_by_score"][name]
    assert got["max"]["image_auc"] == 0.0  # both authentic maxima above both forged ones
    assert got["topk"]["image_auc"] == 1.0  # the top 10 pixels: 0.1 / 0.095 vs 0.9 / 0.85
    assert got["max"]["image_acc"] == 0.5  # everything predicted tampered
    assert got["topk"]["image_acc"] == 1.0  # 0.1, 0.095 <= 0.5 < 0.85, 0.9
    assert got["area"]["image_acc"] == 0.5  # area 0.01 / 0.5: nothing above 0.5 of the image
    # The table of every score does not depend on which one was chosen.
    assert got["max"]["image_auc_by_score"] == got["topk"]["image_auc_by_score"]
    assert got["max"]["image_auc_by_score"]["mean"] == 1.0
    assert got["contrast"]["image_auc"] == 1.0  # lower halves all 0: contrast = topk


def test_image_score_one_class_is_none():
    m = IMLMetrics(image_score="topk")
    m.update(torch.rand(3, 4, 4), torch.zeros(3, 4, 4))
    r = m.compute()
    assert r["image_auc"] is None and set(r["image_auc_by_score"].values()) == {None}
    assert IMLMetrics().compute()["image_auc_by_score"] == {}


@pytest.mark.parametrize("kwargs, match", [
    ({"image_score": "median"}, r"eval\.image_score.*max, topk, area, mean, weighted, contrast.*'median'"),
    ({"image_topk": 0.0}, r"eval\.image_topk.*\(0, 1\]"),
    ({"image_topk": 1.5}, r"eval\.image_topk.*\(0, 1\]"),
    ({"image_topk": True}, r"eval\.image_topk"),
])
def test_bad_image_score(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IMLMetrics(**kwargs)
    with pytest.raises(ValueError, match=match):
        per_image_metrics(torch.rand(2, 2), torch.zeros(2, 2), **kwargs)


def test_config_validates_image_score():
    from fastiml.engine.config import ConfigError, load_config

    cfg = load_config(None, ["eval.image_score=topk", "eval.image_topk=1"])
    assert cfg["eval"]["image_score"] == "topk" and cfg["eval"]["image_topk"] == 1.0
    assert load_config(None, [])["eval"]["image_score"] == "max"  # the default
    with pytest.raises(ConfigError, match=r"eval\.image_score must be one of max, topk, area, mean, "
                                          r"weighted, contrast; got 'median'"):
        load_config(None, ["eval.image_score=median"])
    for bad in ("0", "-0.1", "1.01", "nan"):
        with pytest.raises(ConfigError, match=r"eval\.image_topk must be in \(0, 1\]"):
            load_config(None, [f"eval.image_topk={bad}"])


class _FirstChannel:
    """A stand-in method whose prediction is the image's first channel."""

    @staticmethod
    def predict(net, x):
        return x[:, :1]


def test_evaluate_passes_the_image_score():
    from fastiml.engine.evaluate import evaluate, image_score_from_config

    prob, mask = _images_max_cannot_separate()
    items = [{"image": p[None].expand(3, -1, -1).clone(), "mask": m[None],
              "valid": torch.ones(1, 10, 10, dtype=torch.bool)} for p, m in zip(prob, mask)]
    kw = image_score_from_config({"image_score": "topk", "image_topk": 0.1})
    r = evaluate(torch.nn.Linear(1, 1), _FirstChannel(), items, batch_size=3, **kw)
    assert r["image_score"] == "topk" and r["image_auc"] == 1.0
    assert image_score_from_config({}) == {"image_score": "max", "image_topk": 0.01}  # old checkpoints
