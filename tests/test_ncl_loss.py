"""fastiml.losses.NCLLoss and patch_labels (DESIGN section 4).

Each part of the loss is recomputed independently here: BCE with torch, patch classes with
``reference.contour_mine``, patch embeddings by explicit loops over cells, SupCon through a
materialised similarity matrix, the pivot term with ``reference.pivot_consistency``.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import generator
from fastiml import reference
from fastiml.losses import NCLLoss
from fastiml.losses.ncl import patch_labels

PARTS = {"bce_a", "bce_b", "supcon_a", "supcon_b", "pivot"}
IGNORE = -1  # the label SupCon leaves out (pair_stats' ignore_index)


@pytest.fixture(autouse=True)
def _one_thread(num_threads):
    """One intra-op thread: tiny problems, and a loaded 2-core machine (see test_contour)."""
    num_threads(1)


# --------------------------------------------------------------------------------- helpers

def make_batch(b=2, d=8, h=8, w=8, stride=2, dtype=torch.float64, seed=0, big=None,
               contour=True):
    """Free tensors for the two branches, and a mask of rectangles at logit resolution.

    With ``contour=True`` the rectangles' edges cut through cells (contour patches exist); with
    False they lie on the cell grid of any patch dividing 4 * stride (no contour patch)."""
    g = generator(seed)
    big_h, big_w = big if big is not None else (h * stride, w * stride)
    proj_a = torch.randn(b, d, h, w, generator=g, dtype=dtype)
    proj_b = torch.randn(b, d, h, w, generator=g, dtype=dtype)
    logit_a = torch.randn(b, 1, big_h, big_w, generator=g, dtype=dtype)
    logit_b = torch.randn(b, 1, big_h, big_w, generator=g, dtype=dtype)
    mask = torch.zeros(b, big_h, big_w, dtype=torch.bool)
    step = 4 * stride
    for i in range(b):
        if contour:
            y0 = 1 + int(torch.randint(0, big_h // 3, (1,), generator=g))
            x0 = 1 + int(torch.randint(0, big_w // 3, (1,), generator=g))
            mask[i, y0:y0 + big_h // 2 + i, x0:x0 + big_w // 2 + 1] = True
        else:
            mask[i, step * i:step * (i + 1), : step * (i + 1)] = True
    return proj_a, proj_b, logit_a, logit_b, mask


def cell_embeddings(proj, p):
    """Mean of the projected pixels of each p x p cell (partial cells: their own pixels),
    L2-normalised, in row-major cell order of the batch."""
    b, d, h, w = proj.shape
    gh, gw = -(-h // p), -(-w // p)
    rows = []
    for i in range(b):
        for cy in range(gh):
            for cx in range(gw):
                rows.append(proj[i, :, cy * p:(cy + 1) * p, cx * p:(cx + 1) * p].mean((1, 2)))
    return F.normalize(torch.stack(rows), dim=1)


def labels_for(klass, contour_as):
    """DESIGN 4's labels of one branch's cells: authentic 0, tampered 1, contour cells tampered
    (branch A), authentic (branch B) or left out (None: the drop ablation); cells without a
    valid pixel left out. Written here: ``patch_labels`` is under test."""
    contour = {"tampered": 1, "authentic": 0, None: IGNORE}[contour_as]
    labels = torch.where(klass == 2, contour, klass.long())
    return torch.where(klass < 0, IGNORE, labels)


def dense_supcon(rows, labels, groups, tau):
    """SupCon with exclude-self through the full similarity matrix; mean over anchors that have
    a positive (0 when none has)."""
    n = len(labels)
    s = rows @ rows.t() / tau
    counted = (labels[:, None] != IGNORE) & (labels[None, :] != IGNORE)
    counted &= ~torch.eye(n, dtype=torch.bool)
    if groups is not None:
        counted &= groups[:, None] == groups[None, :]
    pos = counted & (labels[:, None] == labels[None, :])
    keep = pos.any(1)
    if not keep.any():
        return rows.sum() * 0
    lse = torch.logsumexp(s.masked_fill(~counted, float("-inf")), 1)
    pos_mean = (s * pos).sum(1) / pos.sum(1).clamp(min=1)
    return (lse - pos_mean)[keep].mean()


def expected_parts(loss: NCLLoss, proj_a, proj_b, logit_a, logit_b, mask, valid=None):
    """The five parts for aligned sizes (logit size a whole multiple of the projection size)."""
    h = proj_a.shape[-2]
    stride = logit_a.shape[-2] // h
    p = loss.patch
    _, klass = reference.contour_mine(mask, p * stride, lo=loss.lo, hi=loss.hi, valid=valid)
    target = (mask != 0).double() if mask.dtype == torch.uint8 else mask.double()
    keep = torch.ones_like(target) if valid is None else valid.double()

    def bce(logit):
        per_pixel = F.binary_cross_entropy_with_logits(logit[:, 0].double(), target,
                                                       reduction="none")
        return (per_pixel * keep).sum() / keep.sum()

    drop = loss.contour == "drop"
    groups = None
    if loss.within_image:
        groups = torch.arange(mask.shape[0]).repeat_interleave(klass[0].numel())
    sc = {}
    for name, proj, as_ in (("supcon_a", proj_a, "tampered"), ("supcon_b", proj_b, "authentic")):
        labels = labels_for(klass, None if drop else as_).reshape(-1)
        sc[name] = dense_supcon(cell_embeddings(proj.double(), p), labels, groups, loss.tau)
    pivot = torch.zeros((), dtype=torch.float64) if drop else reference.pivot_consistency(
        logit_a.double(), logit_b.double(), klass, p * stride,
        weight_contour=loss.weight_contour, weight_other=loss.weight_other)
    return {"bce_a": bce(logit_a), "bce_b": bce(logit_b), **sc, "pivot": pivot}, klass


def assert_parts_close(parts, expected, rtol=1e-5):
    assert set(parts) == PARTS
    for name in PARTS:
        torch.testing.assert_close(parts[name].double(), expected[name].double(), rtol=rtol,
                                   atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------- patch_labels

def test_patch_labels_remaps_contour():
    klass = torch.tensor([[[-1, 0], [1, 2]], [[2, 2], [0, -1]]], dtype=torch.int8)
    a = patch_labels(klass, "tampered")
    b = patch_labels(klass, "authentic")
    d = patch_labels(klass, None)
    assert a.dtype == torch.long and a.shape == klass.shape
    assert a.tolist() == [[[-1, 0], [1, 1]], [[1, 1], [0, -1]]]
    assert b.tolist() == [[[-1, 0], [1, 0]], [[0, 0], [0, -1]]]
    assert d.tolist() == [[[-1, 0], [1, -1]], [[-1, -1], [0, -1]]]


# --------------------------------------------------------------------------- the loss parts

@pytest.mark.parametrize("within_image", [False, True])
@pytest.mark.parametrize("patch,stride,h,w", [(2, 2, 8, 8), (4, 1, 10, 9), (3, 2, 7, 8)])
def test_parts_match_independent_computation(patch, stride, h, w, within_image, device):
    proj_a, proj_b, logit_a, logit_b, mask = make_batch(3, 6, h, w, stride, seed=patch + h)
    loss = NCLLoss(patch=patch, tau=0.2, lambda_contrast=0.3, lambda_pivot=0.7,
                   within_image=within_image, weight_other=0.25)
    total, parts = loss(*(t.to(device) for t in (proj_a, proj_b, logit_a, logit_b, mask)))
    assert total.device.type == device
    total, parts = total.cpu(), {k: v.cpu() for k, v in parts.items()}
    expected, klass = expected_parts(loss, proj_a, proj_b, logit_a, logit_b, mask)
    assert (klass == 2).any() and (klass == 0).any()
    assert_parts_close(parts, expected)
    combo = (expected["bce_a"] + expected["bce_b"] + 0.3 * (expected["supcon_a"]
             + expected["supcon_b"]) + 0.7 * expected["pivot"])
    torch.testing.assert_close(total.double(), combo, rtol=1e-5, atol=1e-6)


def documented_parts(proj_a, proj_b, logit_a, logit_b, mask, patch, tau):
    """DESIGN 4's five parts from pieces that share no code with fastiml.losses: BCE through
    torch.nn.functional, cell classes from the cells' tampered fractions, SupCon through
    ``reference.pair_stats`` over the cell embeddings (contour cells tampered in branch A,
    authentic in B), the pivot term through DESIGN 2.3's closed form: the mean over the pixels
    of contour cells of ``(sigmoid(a) - sigmoid(b)) * (a - b)``. For logit sizes a whole multiple
    of ``patch * stride``, without ``valid``."""
    cell = patch * logit_a.shape[-2] // proj_a.shape[-2]
    target = mask.double()
    frac = F.avg_pool2d(target[:, None], cell)[:, 0]
    klass = torch.where(frac == 0, 0, torch.where(frac == 1, 1, 2))

    def bce(logit):
        return F.binary_cross_entropy_with_logits(logit[:, 0].double(), target)

    def supcon(proj, contour_as):
        labels = labels_for(klass, contour_as).reshape(-1)
        lse, pos_mean, count = reference.pair_stats(cell_embeddings(proj.double(), patch), None,
                                                    labels, None, tau=tau, exclude_self=True)
        return (lse - pos_mean)[count > 0].mean()

    a, b = logit_a.double(), logit_b.double()
    contour = (klass == 2).repeat_interleave(cell, 1).repeat_interleave(cell, 2)[:, None]
    pivot = ((torch.sigmoid(a) - torch.sigmoid(b)) * (a - b))[contour].mean()
    return {"bce_a": bce(logit_a), "bce_b": bce(logit_b), "supcon_a": supcon(proj_a, "tampered"),
            "supcon_b": supcon(proj_b, "authentic"), "pivot": pivot}


# None: the defaults, which DESIGN 4 documents as lambda_c = 0.1, lambda_p = 1.0
@pytest.mark.parametrize("lambdas", [None, (0.3, 0.7), (0.0, 0.0), (2.0, 5.0)])
def test_total_is_the_documented_combination(lambdas):
    """total = BCE_a + BCE_b + lambda_c (SupCon_a + SupCon_b) + lambda_p pivot, every piece
    recomputed independently (not the loss's own parts)."""
    lc, lp = (0.1, 1.0) if lambdas is None else lambdas
    batch = make_batch(2, 8, 8, 8, 2, dtype=torch.float32, seed=1)
    batch = [t.requires_grad_() if t.is_floating_point() else t for t in batch]
    loss = NCLLoss(patch=2) if lambdas is None else NCLLoss(patch=2, lambda_contrast=lc,
                                                            lambda_pivot=lp)
    total, parts = loss(*batch)
    assert set(parts) == PARTS
    assert total.dtype == torch.float32 and total.shape == () and total.requires_grad
    assert all(not v.requires_grad and v.shape == () for v in parts.values())
    want = documented_parts(*(t.detach() for t in batch), patch=2, tau=0.1)
    assert want["pivot"] > 0 and want["supcon_a"] != want["supcon_b"]
    assert_parts_close(parts, want)
    combo = (want["bce_a"] + want["bce_b"] + lc * (want["supcon_a"] + want["supcon_b"])
             + lp * want["pivot"])
    torch.testing.assert_close(total.double(), combo, rtol=1e-5, atol=1e-6)


def test_defaults():
    loss = NCLLoss()
    assert (loss.patch, loss.tau, loss.lambda_contrast, loss.lambda_pivot) == (4, 0.1, 0.1, 1.0)
    assert (loss.lo, loss.hi, loss.within_image, loss.contour) == (0.0, 1.0, False, "pivot")


def test_sgd_steps_decrease_the_total():
    proj_a, proj_b, logit_a, logit_b, mask = make_batch(2, 8, 8, 8, 2, dtype=torch.float32,
                                                        seed=2)
    params = [t.clone().requires_grad_() for t in (proj_a, proj_b, logit_a, logit_b)]
    opt = torch.optim.SGD([{"params": params[:2], "lr": 2.0},
                           {"params": params[2:], "lr": 200.0}])  # BCE is a mean over pixels
    loss = NCLLoss(patch=2, lambda_contrast=0.5)
    history, parts_history = [], []
    for _ in range(6):
        opt.zero_grad()
        total, parts = loss(*params, mask)
        total.backward()
        assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in params)
        opt.step()
        history.append(total.item())
        parts_history.append(parts)
    assert all(b < a for a, b in zip(history, history[1:])), history
    assert history[-1] < 0.8 * history[0], history
    for name in ("bce_a", "bce_b", "supcon_a", "supcon_b"):
        assert parts_history[-1][name] < parts_history[0][name], name


def test_gradients_match_independent_computation():
    proj_a, proj_b, logit_a, logit_b, mask = make_batch(2, 5, 6, 6, 2, seed=3)
    loss = NCLLoss(patch=2, lambda_contrast=0.4, lambda_pivot=0.6, within_image=True)
    xs = [t.clone().requires_grad_() for t in (proj_a, proj_b, logit_a, logit_b)]
    total, _ = loss(*xs, mask)
    grads = torch.autograd.grad(total * 1.7, xs)
    ys = [t.clone().requires_grad_() for t in (proj_a, proj_b, logit_a, logit_b)]
    expected, _ = expected_parts(loss, *ys, mask)
    ref_total = (expected["bce_a"] + expected["bce_b"] + 0.4 * (expected["supcon_a"]
                 + expected["supcon_b"]) + 0.6 * expected["pivot"])
    ref_grads = torch.autograd.grad(ref_total * 1.7, ys)
    for name, g, r in zip(("proj_a", "proj_b", "logit_a", "logit_b"), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------ contour handling

def test_drop_mode_ignores_contour_patches_and_pivot():
    proj_a, proj_b, logit_a, logit_b, mask = make_batch(2, 6, 8, 8, 2, seed=4)
    loss = NCLLoss(patch=2, contour="drop")
    total, parts = loss(proj_a, proj_b, logit_a, logit_b, mask)
    assert parts["pivot"].item() == 0.0
    expected, klass = expected_parts(loss, proj_a, proj_b, logit_a, logit_b, mask)
    assert_parts_close(parts, expected)
    assert (klass == 2).any()
    assert not (patch_labels(klass, None) == 2).any()
    assert (patch_labels(klass, None)[klass == 2] == IGNORE).all()
    # The projections inside contour cells take no part in either branch's SupCon...
    contour_px = (klass == 2).repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None]
    noisy_a = proj_a + 10 * torch.randn_like(proj_a) * contour_px
    noisy_b = proj_b + 10 * torch.randn_like(proj_b) * contour_px
    _, parts2 = loss(noisy_a, noisy_b, logit_a, logit_b, mask)
    for name in ("supcon_a", "supcon_b"):
        torch.testing.assert_close(parts2[name], parts[name], rtol=1e-12, atol=1e-12)
    # ... while in pivot mode they do.
    _, p_pivot = NCLLoss(patch=2)(proj_a, proj_b, logit_a, logit_b, mask)
    _, p_pivot2 = NCLLoss(patch=2)(noisy_a, noisy_b, logit_a, logit_b, mask)
    assert p_pivot["supcon_a"] != p_pivot2["supcon_a"]
    # and dropping changes the contrastive terms when contour patches exist
    assert parts["supcon_a"] != p_pivot["supcon_a"]


def test_branches_remap_contour_in_opposite_directions():
    proj, _, logit_a, logit_b, mask = make_batch(2, 6, 8, 8, 2, seed=5)
    loss = NCLLoss(patch=2)
    _, parts = loss(proj, proj, logit_a, logit_b, mask)
    _, klass = reference.contour_mine(mask, 4)
    assert (klass == 2).any()
    assert parts["supcon_a"] != parts["supcon_b"]
    # each branch matches SupCon with its own labelling
    rows = cell_embeddings(proj, 2)
    for name, as_ in (("supcon_a", "tampered"), ("supcon_b", "authentic")):
        labels = labels_for(klass, as_).reshape(-1)
        torch.testing.assert_close(parts[name].double(), dense_supcon(rows, labels, None, 0.1),
                                   rtol=1e-5, atol=1e-6)
    # no contour patch: both branches see the same labels, so equal projections agree
    proj, _, logit_a, logit_b, mask = make_batch(2, 6, 8, 8, 2, seed=5, contour=False)
    _, klass = reference.contour_mine(mask, 4)
    assert not (klass == 2).any() and (klass == 1).any()
    _, parts = loss(proj, proj, logit_a, logit_b, mask)
    assert parts["supcon_a"] == parts["supcon_b"]
    assert parts["pivot"] == 0  # weight_other = 0 and no contour cell


def test_within_image_changes_the_contrast():
    proj_a, proj_b, logit_a, logit_b, mask = make_batch(2, 6, 8, 8, 2, seed=6)
    _, across = NCLLoss(patch=2, within_image=False)(proj_a, proj_b, logit_a, logit_b, mask)
    _, within = NCLLoss(patch=2, within_image=True)(proj_a, proj_b, logit_a, logit_b, mask)
    assert across["supcon_a"] != within["supcon_a"]
    assert across["supcon_b"] != within["supcon_b"]
    for name in ("bce_a", "bce_b", "pivot"):
        assert across[name] == within[name]
    # and each mode is SupCon with (within) or without (across) per-image groups
    for within_image, parts in ((False, across), (True, within)):
        loss = NCLLoss(patch=2, within_image=within_image)
        expected, _ = expected_parts(loss, proj_a, proj_b, logit_a, logit_b, mask)
        assert_parts_close(parts, expected)


def test_pixel_level_patch_1():
    proj_a, proj_b, logit_a, logit_b, mask = make_batch(2, 4, 6, 7, 2, seed=7)
    loss = NCLLoss(patch=1, within_image=True)
    total, parts = loss(proj_a, proj_b, logit_a, logit_b, mask)
    assert torch.isfinite(total)
    expected, klass = expected_parts(loss, proj_a, proj_b, logit_a, logit_b, mask)
    assert klass.shape == (2, 6, 7) and (klass == 2).any()  # 2 x 2 logit cells per pixel
    assert_parts_close(parts, expected)


@pytest.mark.parametrize("shapes", [((5, 5), (16, 16)), ((6, 4), (16, 16)), ((7, 9), (16, 20)),
                                    ((4, 4), (4, 4))])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_unaligned_sizes_match_the_reference(shapes, kind):
    """Logits not a whole multiple of the projection grid: the contrastive patches come from the
    area-averaged target (adaptive average pooling, float64 here), the pivot and BCE terms from
    the full-resolution mask; every part against float64 reference values, and the gradient of
    the total against the float64 gradient of the expected total."""
    (h, w), big = shapes
    proj_a, proj_b, logit_a, logit_b, mask = make_batch(2, 6, h, w, 1, seed=h * w, big=big)
    mask = mask if kind == "bool" else mask.float() * 0.9
    loss = NCLLoss(patch=2)
    xs = [t.detach().clone().requires_grad_() for t in (proj_a, proj_b, logit_a, logit_b)]
    total, parts = loss(*xs, mask)
    grads = torch.autograd.grad(total, xs)

    refs = [t.detach().clone().requires_grad_() for t in (proj_a, proj_b, logit_a, logit_b)]
    target = mask.double()
    _, klass_full = reference.contour_mine(mask, 2, lo=loss.lo, hi=loss.hi)
    small = F.adaptive_avg_pool2d(target[:, None], (h, w))[:, 0]
    _, klass = reference.contour_mine(small, 2, lo=loss.lo, hi=loss.hi)
    expected = {
        "bce_a": F.binary_cross_entropy_with_logits(refs[2][:, 0], target),
        "bce_b": F.binary_cross_entropy_with_logits(refs[3][:, 0], target),
        "supcon_a": dense_supcon(cell_embeddings(refs[0], 2),
                                 labels_for(klass, "tampered").reshape(-1), None, loss.tau),
        "supcon_b": dense_supcon(cell_embeddings(refs[1], 2),
                                 labels_for(klass, "authentic").reshape(-1), None, loss.tau),
        "pivot": reference.pivot_consistency(refs[2], refs[3], klass_full, 2),
    }
    assert_parts_close(parts, expected)
    expected_total = (expected["bce_a"] + expected["bce_b"] + loss.lambda_contrast
                      * (expected["supcon_a"] + expected["supcon_b"])
                      + loss.lambda_pivot * expected["pivot"])
    torch.testing.assert_close(total.double(), expected_total, rtol=1e-5, atol=1e-6)
    for name, got, want in zip(("proj_a", "proj_b", "logit_a", "logit_b"), grads,
                               torch.autograd.grad(expected_total, refs)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6, msg=name)


def test_unaligned_sizes_accept_uint8_255_masks():
    """Regression: the unaligned path once area-resized mask.float(), so 0/255 masks reached
    contour_mine as floats up to 255."""
    proj_a, proj_b, logit_a, logit_b, mask = make_batch(2, 6, 5, 5, 1, seed=8, big=(16, 16))
    total, _ = NCLLoss(patch=2)(proj_a, proj_b, logit_a, logit_b, mask.to(torch.uint8) * 255)
    total_bool, _ = NCLLoss(patch=2)(proj_a, proj_b, logit_a, logit_b, mask)
    torch.testing.assert_close(total, total_bool)


@pytest.mark.parametrize("kind", ["uint8_01", "uint8_255", "float"])
def test_mask_encodings_agree_on_aligned_sizes(kind):
    proj_a, proj_b, logit_a, logit_b, mask = make_batch(2, 6, 8, 8, 2, seed=9)
    other = {"uint8_01": mask.to(torch.uint8), "uint8_255": mask.to(torch.uint8) * 255,
             "float": mask.double()}[kind]
    loss = NCLLoss(patch=2)
    t1, p1 = loss(proj_a, proj_b, logit_a, logit_b, mask)
    t2, p2 = loss(proj_a, proj_b, logit_a, logit_b, other[:, None])  # B x 1 x H x W too
    torch.testing.assert_close(t2, t1, rtol=1e-12, atol=0)


# -------------------------------------------------------------------------------- padding

def test_valid_padding_is_excluded():
    """Zero padding on whole cells (bottom 4 rows, right 8 columns of a 16 x 16 logit map,
    p * stride = 4): no part changes when the logits or projections of the padding change,
    and BCE is the mean over valid pixels."""
    proj_a, proj_b, logit_a, logit_b, mask = make_batch(2, 6, 8, 8, 2, seed=10)
    valid = torch.ones_like(mask)
    valid[:, 12:] = False
    valid[1, :, 8:] = False
    mask_garbage = mask.clone()
    mask_garbage[~valid] = True
    loss = NCLLoss(patch=2, weight_other=0.5)
    total, parts = loss(proj_a, proj_b, logit_a, logit_b, mask_garbage, valid)
    expected, klass = expected_parts(loss, proj_a, proj_b, logit_a, logit_b, mask_garbage, valid)
    assert_parts_close(parts, expected)
    assert (klass[:, 3] == -1).all() and (klass[1, :, 2:] == -1).all()
    pad = ~valid[:, None]
    pad_small = pad[:, :, ::2, ::2]
    changed = (logit_a + 50 * pad, logit_b - 30 * pad)
    noisy = (proj_a + 5 * torch.randn_like(proj_a) * pad_small,
             proj_b + 5 * torch.randn_like(proj_b) * pad_small)
    total2, parts2 = loss(*noisy, *changed, mask, valid)
    for name in PARTS:
        torch.testing.assert_close(parts2[name], parts[name], rtol=1e-10, atol=1e-12,
                                   msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(total2, total, rtol=1e-10, atol=1e-12)
    # without valid, those pixels count
    _, parts3 = loss(proj_a, proj_b, *changed, mask_garbage)
    assert parts3["bce_a"] != parts["bce_a"]


def _padded_through_cells():
    """A batch whose valid region ends inside cells, and NCLLoss's parts without and with the
    padded logits pushed far away."""
    proj_a, proj_b, logit_a, logit_b, mask = make_batch(2, 6, 8, 8, 2, seed=11)
    valid = torch.ones_like(mask)
    valid[:, 13:] = False
    valid[:, :, 10:] = False
    pad = ~valid[:, None]
    loss = NCLLoss(patch=2)
    _, parts = loss(proj_a, proj_b, logit_a, logit_b, mask, valid)
    _, parts2 = loss(proj_a, proj_b, logit_a + 40 * pad, logit_b - 40 * pad, mask, valid)
    return (logit_a, logit_b, mask, valid), parts, parts2


def test_bce_ignores_padded_logits_in_partial_cells():
    """Padding that cuts through cells: BCE still ignores the padded pixels."""
    _, parts, parts2 = _padded_through_cells()
    for name in ("bce_a", "bce_b"):
        torch.testing.assert_close(parts2[name], parts[name], rtol=1e-12, atol=0)


def test_pivot_ignores_padded_logits_in_partial_cells():
    """Regression: the pivot term once weighed every pixel of a partially valid contour cell,
    padded ones included."""
    (logit_a, logit_b, mask, valid), parts, parts2 = _padded_through_cells()
    torch.testing.assert_close(parts2["pivot"], parts["pivot"], rtol=1e-6, atol=1e-9)
    # the weighted mean of J over the valid pixels only
    _, klass = reference.contour_mine(mask, 4, valid=valid)
    assert (klass == 2).any()
    up = klass.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None]
    weight = (up == 2).double() * valid[:, None]
    j = (torch.sigmoid(logit_a) - torch.sigmoid(logit_b)) * (logit_a - logit_b)
    expected = (weight * j).sum() / weight.sum()
    torch.testing.assert_close(parts["pivot"].double(), expected, rtol=1e-6, atol=1e-9)
    partial = (klass == 2) & (reference.contour_mine(valid, 4)[0] < 1)
    assert partial.any()  # some contour cell is cut by the padding


# ----------------------------------------------------------------------------- bad inputs

def _bad_cases():
    pa, pb, la, lb, m = make_batch(2, 4, 4, 4, 2, dtype=torch.float32)
    ok = dict(proj_a=pa, proj_b=pb, logit_a=la, logit_b=lb, mask=m)
    return ok, [
        (dict(proj_b=pb[:, :3]), "proj_b"),
        (dict(proj_b=pb[:1]), "proj_b"),
        (dict(proj_a=pa[0]), "proj_a"),
        (dict(logit_a=la[:1], logit_b=lb[:1], mask=m[:1]), "logit_a"),
        (dict(logit_a=torch.cat([la, la], 1), logit_b=torch.cat([lb, lb], 1)), "logit_a"),
        (dict(logit_a=la[:, 0]), "logit_a"),
        (dict(logit_b=lb[..., :7]), "logit_b"),
        (dict(mask=m[:, :7]), "mask"),
        (dict(mask=m[:1]), "mask"),
        (dict(mask=m[0]), "mask"),
        (dict(mask=torch.stack([m, m], 1)), "mask"),
        (dict(valid=torch.ones(2, 8, 7, dtype=torch.bool)), "valid"),
        (dict(proj_a=torch.zeros(2, 4, 16, 16), proj_b=torch.zeros(2, 4, 16, 16)), "projection"),
    ]


@pytest.mark.parametrize("case", range(13))
def test_bad_inputs_raise(case):
    ok, cases = _bad_cases()
    kwargs, match = cases[case]
    args = {**ok, **kwargs}
    with pytest.raises(ValueError, match=match):
        NCLLoss(patch=2)(args["proj_a"], args["proj_b"], args["logit_a"], args["logit_b"],
                         args["mask"], args.get("valid"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(patch=0), "patch"), (dict(patch=-1), "patch"), (dict(patch=2.0), "patch"),
    (dict(contour="ignore"), "contour"), (dict(contour=None), "contour"),
    (dict(tau=0.0), "tau"), (dict(lo=0.6, hi=0.4), "lo"), (dict(hi=1.2), "hi"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NCLLoss(**kwargs)


def test_supcon_patch_means_ignore_padded_projection_pixels():
    """Padding that cuts through patches: the projections of padded pixels must not move the
    patch embeddings (valid-weighted means), so changing them leaves the SupCon terms as they are."""
    proj_a, proj_b, logit_a, logit_b, mask = make_batch(2, 6, 8, 8, 2, seed=12)
    valid = torch.ones_like(mask, dtype=torch.bool)
    valid[:, :, 10:] = False  # logit columns 10.. (stride 2: projection columns 5..) are padding
    loss = NCLLoss(patch=2)
    _, parts = loss(proj_a, proj_b, logit_a, logit_b, mask, valid)
    noisy = torch.zeros_like(proj_a)
    noisy[..., 5:] = 5.0  # cell (4, 5) of patch 2 is half padding: its mean must use column 4 only
    _, parts2 = loss(proj_a + noisy, proj_b - noisy, logit_a, logit_b, mask, valid)
    for name in ("supcon_a", "supcon_b"):
        torch.testing.assert_close(parts2[name], parts[name], rtol=1e-6, atol=1e-7)
    _, parts3 = loss(proj_a + noisy, proj_b - noisy, logit_a, logit_b, mask, None)
    assert not torch.allclose(parts3["supcon_a"], parts["supcon_a"])  # it does matter otherwise
