"""IMDL-BenCo interoperability: the model dict contract of fastiml.integrations.imdlbenco, and
fastiml.metrics.IMLMetrics against BenCo's evaluators on the same predictions.

BenCo itself is not installed (it pins numpy<2 and an old albumentations), so its evaluators are
re-implemented below as the oracle, formula for formula, from scu-zjz/IMDLBenCo at commit
3efef9b (the newest snapshot read): IMDLBenCo/evaluation/F1.py (PixelF1: Cal_Confusion_Matrix,
Cal_F1, modes "origin" / "double"), IMDLBenCo/evaluation/AUC.py (PixelAUC.Cal_AUC; ImageAUC =
sklearn's roc_auc_score of the model's pred_label) and the averaging of per-image values in
IMDLBenCo/training_scripts/tester/tester.py (sum over the batch, divided by the image count).
"""
import inspect

import pytest
import torch
from sklearn.metrics import roc_auc_score

from fastiml.integrations import imdlbenco
from fastiml.integrations.imdlbenco import FastimlMPC, FastimlNCL
from fastiml.metrics import IMLMetrics
from fastiml.models.layers import IMAGENET_MEAN, IMAGENET_STD

TINY_NCL = dict(encoder="resnet18", base_width=8, decoder_channels=16, proj_dim=16, patch=2)
TINY_MPC = dict(encoder="resnet18", base_width=8, embed_dim=16, head_channels=16)


# ------------------------------------------------------------------- BenCo's formulas (oracle)
def benco_pixel_f1(predict, mask, shape_mask=None, threshold=0.5, mode="origin"):
    """Per-image F1, B×1×H×W inputs -> Tensor[B] (F1.py, PixelF1.batch_update)."""
    predict = (predict > threshold).float()
    sm = torch.ones_like(mask) if shape_mask is None else shape_mask
    tp = torch.sum(predict * mask * sm, dim=(1, 2, 3))
    tn = torch.sum((1 - predict) * (1 - mask) * sm, dim=(1, 2, 3))
    fp = torch.sum(predict * (1 - mask) * sm, dim=(1, 2, 3))
    fn = torch.sum((1 - predict) * mask * sm, dim=(1, 2, 3))

    def f1(tp, tn, fp, fn):
        precision = tp / (tp + fp + 1e-8)
        recall = tp / (tp + fn + 1e-8)
        return 2 * precision * recall / (precision + recall + 1e-8)

    if mode == "origin":
        return f1(tp, tn, fp, fn)
    return torch.max(f1(tp, tn, fp, fn), f1(fn, fp, tn, tp))  # "double"


def benco_cal_auc(y_true, y_scores, shape_mask=None):
    """One image's AUC (AUC.py, PixelAUC.Cal_AUC): trapezoids over the score-sorted pixels."""
    if shape_mask is not None:
        y_true = y_true * shape_mask
        y_scores = y_scores * shape_mask
    y_true, y_scores = y_true.flatten(), y_scores.flatten()
    if torch.sum(y_true) == 0:
        return 0.0
    if shape_mask is not None:
        keep = shape_mask.flatten() > 0
        y_true, y_scores = y_true[keep], y_scores[keep]
    y_sorted = y_true[torch.argsort(y_scores, descending=True)]
    n_pos = torch.sum(y_sorted).item()
    n_neg = len(y_sorted) - n_pos
    tpr = torch.cumsum(y_sorted, dim=0) / n_pos
    fpr = torch.cumsum(1 - y_sorted, dim=0) / n_neg
    return torch.trapz(tpr, fpr).item()


def benco_pixel_auc(predict, mask, shape_mask=None, mode="origin"):
    out = []
    for i in range(predict.shape[0]):
        sm = None if shape_mask is None else shape_mask[i]
        auc = benco_cal_auc(mask[i], predict[i], sm)
        if mode == "double":
            auc = max(auc, benco_cal_auc(mask[i], 1 - predict[i], sm))
        out.append(auc)
    return torch.tensor(out)


def benco_mean(per_image: torch.Tensor) -> float:
    return float(per_image.sum() / per_image.numel())  # tester.py: sum, then _n = batch size


# -------------------------------------------------------------------------- random batches
def random_batch(n, h=24, w=32, seed=0, authentic=0, pad=False):
    """Probabilities without ties and never equal to a threshold used here, masks with a
    rectangle of tampered pixels; the last ``authentic`` images have an empty mask. With ``pad``,
    a bottom/right band of each image is padding (shape_mask 0)."""
    g = torch.Generator().manual_seed(seed)
    npx = h * w
    mask = torch.zeros(n, 1, h, w)
    shape_mask = torch.ones(n, 1, h, w)
    for i in range(n - authentic):
        y0, x0 = (int(torch.randint(0, h // 2, (1,), generator=g)),
                  int(torch.randint(0, w // 2, (1,), generator=g)))
        mask[i, 0, y0:y0 + h // 3, x0:x0 + w // 3] = 1
    # Distinct ranks (k + 0.5) / npx per image, lifted by 0.45 on tampered pixels: the two
    # classes overlap (F1 and AUC are far from 0 and 1) and no two pixels of an image tie.
    ranks = torch.stack([torch.randperm(npx, generator=g) for _ in range(n)]).view(n, 1, h, w)
    prob = 0.55 * (ranks.double() + 0.5) / npx + 0.45 * mask.double()
    prob = prob.float()
    if pad:
        for i in range(n):
            shape_mask[i, 0, h - 4 - i % 3:, :] = 0
            shape_mask[i, 0, :, w - 3 - i % 2:] = 0
        mask = mask * shape_mask
    for i in range(n):
        assert prob[i].flatten().unique().numel() == npx  # no ties within an image
    return prob, mask, shape_mask


def fastiml_metrics(prob, mask, valid=None, threshold=0.5):
    m = IMLMetrics(threshold)
    m.update(prob, mask, None if valid is None else valid.bool())
    return m.compute()


# ---------------------------------------------------------------------- metric comparison
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_pixel_metrics_equal_bencos_on_tampered_images(pad, threshold):
    prob, mask, shape_mask = random_batch(12, seed=1 + pad, pad=pad)
    sm = shape_mask if pad else None
    ours = fastiml_metrics(prob, mask, shape_mask if pad else None, threshold)
    assert ours["n_tampered"] == 12
    f1 = benco_mean(benco_pixel_f1(prob, mask, sm, threshold, "origin"))
    assert 0.2 < f1 < 0.95
    assert ours["pixel_f1"] == pytest.approx(f1, abs=1e-6)  # BenCo's 1e-8 guards
    auc = benco_mean(benco_pixel_auc(prob, mask, sm, "origin"))
    assert ours["pixel_auc"] == pytest.approx(auc, abs=1e-5)  # BenCo: float32 cumsum / trapz


def test_permuted_f1_equals_bencos_double_mode_at_threshold_one_half():
    # At 0.5, BenCo's inverted prediction not(p > 0.5) and fastiml's (1 - p) > 0.5 differ only
    # for p == 0.5 exactly, which these maps do not contain. Images where the inverted map wins:
    prob, mask, _ = random_batch(10, seed=3)
    prob[:5] = 1 - prob[:5]
    assert not (prob == 0.5).any()
    ours = fastiml_metrics(prob, mask)
    double = benco_mean(benco_pixel_f1(prob, mask, None, 0.5, "double"))
    origin = benco_mean(benco_pixel_f1(prob, mask, None, 0.5, "origin"))
    assert double > origin + 0.1  # the swap matters here
    assert ours["pixel_f1_permuted"] == pytest.approx(double, abs=1e-6)
    assert ours["pixel_f1"] == pytest.approx(origin, abs=1e-6)


def test_image_auc_equals_bencos_with_the_wrappers_pred_label():
    # BenCo's image AUC is roc_auc_score over the model's pred_label; the wrapper's pred_label
    # is fastiml's image score (max of the map over real pixels), so the two AUCs are one number.
    prob, mask, shape_mask = random_batch(16, seed=4, authentic=7, pad=True)
    ours = fastiml_metrics(prob, mask, shape_mask)
    pred_label = prob.masked_fill(shape_mask == 0, 0).flatten(1).max(dim=1).values
    label = (mask.flatten(1).sum(1) > 0).long()
    assert ours["n_authentic"] == 7
    assert ours["image_auc"] == pytest.approx(roc_auc_score(label.numpy(), pred_label.numpy()),
                                              abs=1e-12)


def test_authentic_images_in_a_pixel_set_are_the_documented_difference():
    # BenCo averages per-image pixel F1 / AUC over every image, an authentic one scoring 0;
    # fastiml averages over tampered images only. Same per-image numbers, other denominator.
    prob, mask, _ = random_batch(10, seed=5, authentic=4)
    ours = fastiml_metrics(prob, mask)
    f1 = benco_mean(benco_pixel_f1(prob, mask))
    auc = benco_mean(benco_pixel_auc(prob, mask))
    assert ours["pixel_f1"] * 6 / 10 == pytest.approx(f1, abs=1e-6)
    assert ours["pixel_auc"] * 6 / 10 == pytest.approx(auc, abs=1e-5)
    assert ours["pixel_f1"] > f1 + 0.05


# --------------------------------------------------------------------------- model contract
def benco_image(x01):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x01 - mean) / std


@pytest.mark.parametrize("cls, options", [(FastimlNCL, TINY_NCL), (FastimlMPC, TINY_MPC)])
def test_benco_model_dict_contract(cls, options):
    torch.manual_seed(0)
    model = cls(**options).train()
    x01 = torch.rand(2, 3, 48, 64)
    mask = torch.zeros(2, 1, 48, 64)
    mask[0, :, 8:30, 10:40] = 1
    shape_mask = torch.ones(2, 1, 48, 64)
    shape_mask[:, :, 40:] = 0  # BenCo's padding mode: the bottom rows are padding
    out = model(image=benco_image(x01), mask=mask, label=torch.tensor([1, 0]),
                shape_mask=shape_mask, edge_mask=mask, name=["a.jpg", "b.jpg"],
                shape=torch.tensor([[40, 64], [40, 64]]), if_predcit_label=False)
    assert set(out) == {"backward_loss", "pred_mask", "pred_label", "visual_loss", "visual_image"}
    assert out["backward_loss"].dim() == 0 and out["backward_loss"].requires_grad
    assert out["pred_mask"].shape == (2, 1, 48, 64) and out["pred_label"].shape == (2,)
    pred = out["pred_mask"].detach()
    assert 0 <= float(pred.min()) and float(pred.max()) <= 1
    # pred_label is the max over real pixels only
    real = out["pred_mask"][:, :, :40].flatten(1).max(dim=1).values
    torch.testing.assert_close(out["pred_label"], real)
    # BenCo's trainer calls .item() on each visual loss
    assert "loss" in out["visual_loss"]
    assert all(v.dim() == 0 for v in out["visual_loss"].values())
    torch.testing.assert_close(out["visual_loss"]["loss"], out["backward_loss"].detach())
    out["backward_loss"].backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)


def test_benco_images_are_mapped_back_to_fastiml_inputs():
    # The wrapper undoes BenCo's ImageNet normalisation: its prediction equals the network's on
    # the [0, 1] image. Eval mode: no loss, as BenCo's tester needs none.
    torch.manual_seed(0)
    model = FastimlNCL(**TINY_NCL).eval()
    x01 = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        out = model(image=benco_image(x01), mask=torch.zeros(2, 1, 32, 48))
        direct = model.net(x01)["pred_mask"]
    torch.testing.assert_close(out["pred_mask"], direct, rtol=1e-5, atol=1e-6)
    assert float(out["backward_loss"]) == 0.0 and out["visual_loss"] == {}


def test_mpc_stage_two_trains_only_the_head():
    model = FastimlMPC(stage=2, **TINY_MPC).train()
    x01 = torch.rand(2, 3, 32, 32)
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, :, 4:20, 4:20] = 1
    out = model(image=benco_image(x01), mask=mask, label=torch.tensor([1, 0]))
    assert set(out["visual_loss"]) == {"loss", "focal"}
    out["backward_loss"].backward()
    assert all(p.grad is None for p in model.net.backbone.parameters())
    assert all(p.grad is not None for p in model.net.head.parameters())
    with pytest.raises(ValueError, match="stage must be in 1..2"):
        FastimlMPC(stage=3, **TINY_MPC)


def test_registration_and_bencos_argument_parser_rules():
    class FakeRegistry:  # BenCo's Registry.register_module(name=None, force=False, module=None)
        def __init__(self):
            self.modules = {}

        def register_module(self, name=None, force=False, module=None):
            self.modules[name or module.__name__] = module
            return module

    reg = FakeRegistry()
    assert imdlbenco.register(reg) is True
    assert reg.modules == {"FastimlNCL": FastimlNCL, "FastimlMPC": FastimlMPC}
    # BenCo's misc.create_argparser refuses *args / **kwargs and types options by annotation.
    for cls in (FastimlNCL, FastimlMPC):
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params)
        assert all(p.annotation in (str, int, float, bool) for p in params), cls  # not strings
