"""fastiml.losses.MPCLoss (DESIGN section 5) and the sigmoid focal loss of MPC's second stage.

MPCLoss is compared with ``reference.mpc_loss`` (written from DESIGN 5 without fastiml.losses:
one image and one term at a time, materialised similarity matrices, the same pixel sample), in
all-pixel mode with a loop implementation written here, and with hand-built cases whose value
is known in closed form -- the five terms' pixel sets spelled out in ``TERM_SETS`` below.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close_scaled, generator
from fastiml import reference
from fastiml.losses import MPCLoss, SigmoidFocalLoss, sigmoid_focal_loss
from fastiml.losses.mpc import PixelSet, sample_pixels

# DESIGN 5's five terms: name -> (anchor set, contrast set). X_a: the scale-1 pixels of pass a;
# Y_a: scales 2-4 of pass a, pooled; X_b: the scale-1 pixels of pass b. A term's anchors are the
# authentic pixels of its anchor set, its negatives the forged pixels of its contrast set.
TERM_SETS = {"within": ("X_a", "X_a"),
             "cross_scale_xy": ("X_a", "Y_a"), "cross_scale_yx": ("Y_a", "X_a"),
             "cross_modal_ab": ("X_a", "X_b"), "cross_modal_ba": ("X_b", "X_a")}
TERMS = tuple(TERM_SETS)

SIZES = [(8, 8), (4, 4), (2, 2), (1, 1)]  # strides 4, 8, 16, 32 of a 32 x 32 image
RTOL = 1e-6


@pytest.fixture(autouse=True)
def _one_thread(num_threads):
    """One intra-op thread: tiny problems, and a loaded 2-core machine (see test_contour)."""
    num_threads(1)


# --------------------------------------------------------------------------------- helpers

def make_feats(b=3, c=16, sizes=SIZES, dtype=torch.float64, seed=0):
    g = generator(seed)
    feats = [[torch.randn(b, c, *s, generator=g, dtype=torch.float64).to(dtype)
              .requires_grad_() for s in sizes] for _ in range(2)]
    return feats[0], feats[1]


def make_mask(b=3, size=32, seed=0):
    """Image 0 and 1: forged rectangles; image 2 (when b > 2): authentic (all zero)."""
    g = generator(seed + 100)
    mask = torch.zeros(b, size, size)
    for i in range(min(b, 2)):
        y0, x0 = (int(torch.randint(0, size // 2, (1,), generator=g)) for _ in range(2))
        mask[i, y0:y0 + size // 2, x0:x0 + size // 3 + 4 * i] = 1
    return mask


def independent_mpc(feats_a, feats_b, mask, tau=0.1):
    """DESIGN 5 written out with loops: returns (total, {term: batch mean})."""
    def pixels(maps, i):
        rows, labels = [], []
        for fmap in maps:
            h, w = fmap.shape[-2:]
            lab = F.interpolate(mask[i][None, None].double(), size=(h, w), mode="nearest")[0, 0]
            rows.append(F.normalize(fmap[i].reshape(fmap.shape[1], -1).t(), dim=1))
            labels.append(lab.reshape(-1) > 0.5)
        return torch.cat(rows), torch.cat(labels)

    def term(anchor_set, contrast_set):
        (ra, la), (rc, lc) = anchor_set, contrast_set
        anchors, negatives = ra[~la], rc[lc]
        n = len(anchors)
        if n < 2 or len(negatives) == 0:
            return ra.sum() * 0
        losses = []
        for k in range(n):
            others = torch.cat([anchors[:k], anchors[k + 1:]])
            p = (others @ anchors[k]).mean() / tau
            neg = negatives @ anchors[k] / tau
            losses.append(-(p - torch.logsumexp(torch.cat([p[None], neg]), 0)))
        return torch.stack(losses).mean()

    per_term = {name: [] for name in TERMS}
    for i in range(mask.shape[0]):
        sets = {"X_a": pixels(feats_a[:1], i), "Y_a": pixels(feats_a[1:], i),
                "X_b": pixels(feats_b[:1], i)}
        for name, (a, c) in TERM_SETS.items():
            per_term[name].append(term(sets[a], sets[c]))
    terms = {name: torch.stack(v) for name, v in per_term.items()}
    total = torch.stack(list(terms.values())).sum(0).mean()
    return total, {name: t.mean() for name, t in terms.items()}


def grads(total, feats, c=1.3):
    return torch.autograd.grad(total * c, feats, allow_unused=True, materialize_grads=True)


def assert_same_loss(got, want, rtol=RTOL):
    (total, parts), (rtotal, rparts) = got, want
    assert set(parts) == set(TERMS) == set(rparts)
    assert_close_scaled(total, rtotal, rtol, "total")
    for name in TERMS:
        assert_close_scaled(parts[name], rparts[name], rtol, name)


def assert_same_grads(g, rg, rtol=RTOL):
    for s, (x, y) in enumerate(zip(g, rg)):
        assert torch.isfinite(x).all(), f"map {s}"
        assert_close_scaled(x, y, rtol, f"grad of map {s}")


# ------------------------------------------------------------------------ against reference

@pytest.mark.parametrize("tau", [0.1, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_all_pixels_match_reference(seed, tau, device):
    fa, fb = make_feats(seed=seed)
    mask = make_mask(seed=seed)
    da = [f.detach().to(device).requires_grad_() for f in fa]
    db = [f.detach().to(device).requires_grad_() for f in fb]
    out = MPCLoss(tau=tau)(da, db, mask.to(device))
    ref = reference.mpc_loss(fa, fb, mask, tau=tau)
    assert out[0].dtype == torch.float64 and out[0].shape == ()
    assert out[0].device.type == device
    assert all(not v.requires_grad for v in out[1].values())
    assert_same_loss(out, ref)
    assert all(out[1][name] > 0 for name in TERMS)
    assert_same_grads(grads(out[0], da + db), grads(ref[0], fa + fb))


def test_all_pixels_match_independent_implementation():
    fa, fb = make_feats(c=6, seed=3)
    mask = make_mask(seed=3)
    out = MPCLoss()(fa, fb, mask)
    ind = independent_mpc(fa, fb, mask)
    assert_same_loss(out, ind)
    assert_same_grads(grads(out[0], fa + fb), grads(ind[0], fa + fb))


def hand_built_case(tau, seed=30):
    """One 32 x 32 image, right half forged, whose every authentic pixel of set S points along
    u_S and every forged pixel along v_S (random unit vectors, a pair per set), each pixel at its
    own length. An anchor's positive logit is then exactly 1 / tau, and a term anchored in A and
    contrasted with C is ``log(1 + n_C e^{(<u_A, v_C> - 1) / tau})``, n_C = forged pixels of C.
    Returns (feats_a, feats_b, mask, {(A, C): that value})."""
    g = generator(seed)
    dirs = {s: F.normalize(torch.randn(2, 6, generator=g, dtype=torch.float64), dim=1)
            for s in ("X_a", "Y_a", "X_b")}  # rows: u_S, v_S
    mask = torch.zeros(1, 32, 32)
    mask[..., 16:] = 1

    def fmap(size, s):
        h, w = size
        # nearest resizing reads source column floor(x * 32 / w): forged from it on 16
        forged = (torch.arange(w) * 32 // w >= 16).expand(h, w)
        rows = dirs[s][forged.long()]  # [h, w, 6]
        length = 0.5 + 1.5 * torch.rand(h, w, 1, generator=g, dtype=torch.float64)
        return (rows * length).permute(2, 0, 1)[None].requires_grad_(), int(forged.sum())

    maps_a = [fmap(size, "X_a" if s == 0 else "Y_a") for s, size in enumerate(SIZES)]
    maps_b = [fmap(size, "X_b") for size in SIZES]
    n_forged = {"X_a": maps_a[0][1], "Y_a": sum(n for _, n in maps_a[1:]), "X_b": maps_b[0][1]}
    assert n_forged == {"X_a": 32, "Y_a": 8 + 2 + 0, "X_b": 32}
    value = {(a, c): torch.log1p(n_forged[c] * torch.exp((dirs[a][0] @ dirs[c][1] - 1) / tau))
             for a in dirs for c in dirs}
    return [m for m, _ in maps_a], [m for m, _ in maps_b], mask, value


@pytest.mark.parametrize("tau", [0.5, 1.0])  # every term well above its rounding
def test_each_term_contrasts_its_documented_sets(tau):
    """Every (anchor set, contrast set) pair has its own value in the hand-built case, so each
    term's value names the sets it contrasts: they must be those of TERM_SETS."""
    fa, fb, mask, value = hand_built_case(tau)
    values = sorted(v.item() for v in value.values())
    assert min(b - a for a, b in zip(values, values[1:])) > 1e-3 * values[-1]  # all nine differ
    for got in (MPCLoss(tau=tau)(fa, fb, mask), reference.mpc_loss(fa, fb, mask, tau=tau)):
        total, parts = got
        assert set(parts) == set(TERMS)
        for name, sets in TERM_SETS.items():
            assert_close_scaled(parts[name], value[sets], 1e-10, f"{name} {sets}")
        assert_close_scaled(total, sum(value[sets] for sets in TERM_SETS.values()), 1e-10,
                            "total")


def test_only_scale_one_of_the_second_pass_is_used():
    fa, fb = make_feats(seed=4)
    g = grads(MPCLoss()(fa, fb, make_mask(seed=4))[0], fa + fb)
    assert all(x.abs().sum() > 0 for x in g[:5])
    assert all((x == 0).all() for x in g[5:])


@pytest.mark.parametrize("max_pixels", [2, 5, 17])
def test_sampled_mode_matches_reference(max_pixels):
    fa, fb = make_feats(seed=5)
    mask = make_mask(seed=5)
    loss = MPCLoss(max_pixels=max_pixels)
    out = loss(fa, fb, mask, generator=generator(7))
    ref = reference.mpc_loss(fa, fb, mask, max_pixels=max_pixels, generator=generator(7))
    assert_same_loss(out, ref)
    assert_same_grads(grads(out[0], fa + fb), grads(ref[0], fa + fb))
    # the same seed draws the same sample; another seed another one
    again = loss(fa, fb, mask, generator=generator(7))
    assert torch.equal(again[0], out[0])
    other = loss(fa, fb, mask, generator=generator(8))
    assert other[0] != out[0]
    full = MPCLoss()(fa, fb, mask)
    assert full[0] != out[0]


def test_sampled_mode_with_more_room_than_pixels_uses_every_pixel():
    fa, fb = make_feats(seed=6)
    mask = make_mask(seed=6)
    sampled = MPCLoss(max_pixels=10_000)(fa, fb, mask, generator=generator(1))
    full = MPCLoss()(fa, fb, mask)
    assert_same_loss(sampled, full, rtol=1e-12)


def test_sample_pixels_keeps_at_most_max_per_image_and_label():
    g = generator(9)
    n = 200
    image = torch.randint(0, 3, (n,), generator=g)
    label = torch.randint(0, 2, (n,), generator=g)
    label[image == 2] = 0  # image 2: only authentic pixels
    label[(image == 1).nonzero()[:3, 0]] = 1
    label[(image == 1).nonzero()[3:, 0]] = 0  # image 1: 3 forged pixels only
    rows = torch.arange(n, dtype=torch.float64)[:, None].expand(n, 4).clone()
    s = PixelSet(rows, label, image)
    assert sample_pixels(s, None, generator(0)) is s
    for m in (2, 5, 50):
        out = sample_pixels(s, m, generator(0))
        idx = out.rows[:, 0].long()
        assert (idx[1:] > idx[:-1]).all()  # a subset, in the original order
        assert torch.equal(out.label, label[idx]) and torch.equal(out.image, image[idx])
        for i in range(3):
            for lab in (0, 1):
                total = int(((image == i) & (label == lab)).sum())
                kept = int(((out.image == i) & (out.label == lab)).sum())
                assert kept == min(total, m), (i, lab, m)
        again = sample_pixels(s, m, generator(0))
        assert torch.equal(again.rows, out.rows)
    a = sample_pixels(s, 5, generator(1)).rows
    b = sample_pixels(s, 5, generator(2)).rows
    assert not torch.equal(a, b)


# --------------------------------------------------------------------------- degenerate images

def test_images_are_independent_and_authentic_images_contribute_zero():
    fa, fb = make_feats(seed=10)
    mask = make_mask(seed=10)
    loss = MPCLoss()
    total, parts = loss(fa, fb, mask)
    singles = [loss([f[i:i + 1] for f in fa], [f[i:i + 1] for f in fb], mask[i:i + 1])
               for i in range(3)]
    assert singles[2][0].item() == 0.0
    assert all(v.item() == 0.0 for v in singles[2][1].values())
    torch.testing.assert_close(total, torch.stack([s[0] for s in singles]).mean(), rtol=1e-12,
                               atol=0)
    for name in TERMS:
        torch.testing.assert_close(parts[name], torch.stack([s[1][name] for s in singles]).mean(),
                                   rtol=1e-12, atol=1e-15)
    # the features of the authentic image get no gradient
    g = grads(total, fa + fb)
    assert all((x[2] == 0).all() for x in g) and g[0][:2].abs().sum() > 0


def test_fewer_than_two_authentic_pixels():
    """Image 0 is forged except pixel (0, 0), which nearest resizing keeps at every scale: the
    scale-1 sets have one authentic pixel (terms anchored there are 0), the pooled scales 2-4
    have three (the cross_scale_yx term is defined)."""
    fa, fb = make_feats(b=2, seed=11)
    mask = make_mask(b=2, seed=11)
    mask[0] = 1
    mask[0, 0, 0] = 0
    total, parts = MPCLoss()(fa, fb, mask)
    single = MPCLoss()([f[:1] for f in fa], [f[:1] for f in fb], mask[:1])
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in parts.values())
    for name in ("within", "cross_scale_xy", "cross_modal_ab", "cross_modal_ba"):
        assert single[1][name].item() == 0.0, name
    assert single[1]["cross_scale_yx"] > 0
    ref = reference.mpc_loss(fa, fb, mask)
    assert_same_loss((total, parts), ref)
    g, rg = grads(total, fa + fb), grads(ref[0], fa + fb)
    assert_same_grads(g, rg)
    assert_same_loss((total, parts), independent_mpc(fa, fb, mask))


def test_single_authentic_pixel_gives_zero_terms_and_no_nan():
    """Image 0 of 16 x 16 is forged except pixel (4, 4): nearest resizing keeps it at scale 1
    (4 x 4) only, so every anchor set of that image has at most one authentic pixel and all
    five of its terms are 0 -- without NaN, next to a normal image 1."""
    sizes = [(4, 4), (2, 2), (1, 1), (1, 1)]
    fa, fb = make_feats(b=2, sizes=sizes, seed=12)
    mask = make_mask(b=2, size=16, seed=12)
    mask[0] = 1
    mask[0, 4, 4] = 0
    loss = MPCLoss()
    single = loss([f[:1] for f in fa], [f[:1] for f in fb], mask[:1])
    assert single[0].item() == 0.0 and all(v.item() == 0.0 for v in single[1].values())
    total, parts = loss(fa, fb, mask)
    assert torch.isfinite(total) and total > 0
    g = grads(total, fa + fb)
    assert all(torch.isfinite(x).all() and (x[0] == 0).all() for x in g)
    ref = reference.mpc_loss(fa, fb, mask)
    assert_same_loss((total, parts), ref)
    assert_same_grads(g, grads(ref[0], fa + fb))


@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_all_authentic_or_all_forged_batch_is_zero(fill):
    fa, fb = make_feats(b=2, seed=13)
    mask = torch.full((2, 32, 32), fill)
    total, parts = MPCLoss()(fa, fb, mask)
    assert total.item() == 0.0 and all(v.item() == 0.0 for v in parts.values())
    if total.requires_grad:
        g = grads(total, fa + fb)
        assert all(torch.isfinite(x).all() and (x == 0).all() for x in g)
    rtotal, _ = reference.mpc_loss(fa, fb, mask)
    assert rtotal.item() == 0.0


def test_zero_total_stays_connected_to_the_graph():
    """Like pytorch-metric-learning: a zero loss can still be backpropagated."""
    fa, fb = make_feats(b=2, seed=14)
    for fill in (0.0, 1.0):
        total, _ = MPCLoss()(fa, fb, torch.full((2, 32, 32), fill))
        assert total.requires_grad
        total.backward()
    assert all(f.grad is not None and torch.isfinite(f.grad).all() for f in fa[:1] + fb[:1])


# ------------------------------------------------------------------------- dtypes, encodings

def test_float32_inputs():
    fa, fb = make_feats(seed=15, dtype=torch.float32)
    mask = make_mask(seed=15)
    total, parts = MPCLoss()(fa, fb, mask)
    assert total.dtype == torch.float32
    exact_a = [f.detach().double().requires_grad_() for f in fa]
    exact_b = [f.detach().double().requires_grad_() for f in fb]
    rtotal, rparts = reference.mpc_loss(exact_a, exact_b, mask)
    assert_same_loss((total, parts), (rtotal, rparts), rtol=1e-5)
    g, rg = grads(total, fa + fb), grads(rtotal, exact_a + exact_b)
    assert all(x.dtype == torch.float32 for x in g)
    assert_same_grads(g, rg, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_give_float32_total(dtype):
    fa, fb = make_feats(seed=16, dtype=dtype)
    mask = make_mask(seed=16)
    total, _ = MPCLoss()(fa, fb, mask)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    exact, _ = reference.mpc_loss([f.detach().double() for f in fa],
                                  [f.detach().double() for f in fb], mask)
    torch.testing.assert_close(total.double(), exact, rtol=2e-2, atol=0)
    g = grads(total, fa + fb)
    assert all(x.dtype == dtype and torch.isfinite(x).all() for x in g)


def test_mask_encodings_agree():
    fa, fb = make_feats(seed=17)
    mask = make_mask(seed=17)
    base = MPCLoss()(fa, fb, mask)
    for other in (mask.bool(), (mask * 255).to(torch.uint8), mask[:, None], mask.double()):
        assert_same_loss(MPCLoss()(fa, fb, other), base, rtol=1e-12)


# ----------------------------------------------------------------------------- precision

def test_float64_is_float64_precise():
    """Regression: positive logits were once computed from rows.float(), then divided by
    ``tau * others`` (a Python float times an int64 tensor: float32) -- ~1e-7 relative error
    in float64."""
    fa, fb = make_feats(seed=18)
    mask = make_mask(seed=18)
    out = MPCLoss()(fa, fb, mask)
    ref = reference.mpc_loss(fa, fb, mask)
    assert_same_loss(out, ref, rtol=1e-12)
    assert_same_grads(grads(out[0], fa + fb), grads(ref[0], fa + fb), rtol=1e-10)


def test_gradcheck_float64():
    fa, fb = make_feats(b=1, c=3, sizes=[(4, 4), (2, 2), (1, 1), (1, 1)], seed=18)
    mask = torch.zeros(1, 8, 8)
    mask[0, 2:6, 3:8] = 1
    others = [f.detach() for f in fa[1:] + fb]

    def fn(x):
        return MPCLoss()([x] + others[:3], others[3:], mask)[0]

    assert torch.autograd.gradcheck(fn, (fa[0],), eps=1e-6, atol=1e-8, rtol=1e-6)


# ----------------------------------------------------------------------------- bad inputs

def _bad_cases():
    fa, fb = make_feats(b=2, c=4, seed=19)
    fa = [f.detach() for f in fa]
    fb = [f.detach() for f in fb]
    mask = make_mask(b=2)
    other_c = [torch.zeros(2, 5, *s, dtype=torch.float64) for s in SIZES]
    return (fa, fb, mask), [
        (dict(feats_a=fa[:3]), "feats_a"),
        (dict(feats_b=fb + fb[:1]), "feats_b"),
        (dict(feats_a=tuple(fa[:2])), "feats_a"),
        (dict(feats_a=fa[0]), "feats_a"),
        (dict(feats_a=[fa[0], fa[1][:1], fa[2], fa[3]]), "feats_a"),   # batch of one scale
        (dict(feats_a=[fa[0], fa[1], other_c[2], fa[3]]), "feats_a"),  # channels of one scale
        (dict(feats_a=[fa[0], fa[1], fa[2], fa[3][0]]), "feats_a"),    # a 3-D map
        (dict(feats_b=[fb[0], fb[1], fb[2], fb[3][:1]]), "feats_b"),
        (dict(feats_b=[fb[0][..., :7], fb[1], fb[2], fb[3]]), "feats_b"),
        (dict(feats_b=other_c), "feats_b"),
        (dict(mask=mask[:1]), "mask"),
        (dict(mask=mask[0]), "mask"),
        (dict(mask=torch.stack([mask, mask], 1)), "mask"),
    ]


@pytest.mark.parametrize("case", range(13))
def test_bad_inputs_raise(case):
    (fa, fb, mask), cases = _bad_cases()
    kwargs, match = cases[case]
    args = dict(feats_a=fa, feats_b=fb, mask=mask)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MPCLoss()(args["feats_a"], args["feats_b"], args["mask"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_pixels=1), "max_pixels"), (dict(max_pixels=0), "max_pixels"),
    (dict(max_pixels=-5), "max_pixels"), (dict(max_pixels=2.5), "max_pixels"),
    (dict(tau=0.0), "tau"), (dict(tau=-0.1), "tau"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MPCLoss(**kwargs)


# --------------------------------------------------------------------------- focal loss

def focal_direct(logit, target, alpha, gamma):
    """-alpha_t (1 - p_t)^gamma log(p_t), elementwise, float64."""
    p = torch.sigmoid(logit.double())
    t = target.double()
    p_t = torch.where(t == 1, p, 1 - p)
    alpha_t = torch.where(t == 1, torch.full_like(p, alpha), torch.full_like(p, 1 - alpha))
    return -alpha_t * (1 - p_t) ** gamma * torch.log(p_t)


@pytest.mark.parametrize("alpha,gamma", [(0.5, 2.0), (0.25, 2.0), (0.5, 1.0), (0.75, 0.0)])
def test_focal_matches_direct_formula(alpha, gamma):
    g = generator(20)
    logit = torch.randn(2, 1, 9, 7, generator=g) * 3
    target = (torch.rand(2, 1, 9, 7, generator=g) < 0.3).float()
    got = sigmoid_focal_loss(logit, target, alpha=alpha, gamma=gamma)
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got.double(), focal_direct(logit, target, alpha, gamma).mean(),
                               rtol=1e-5, atol=1e-7)
    module = SigmoidFocalLoss(alpha, gamma)
    assert torch.equal(module(logit, target), got)


def test_focal_defaults_are_mpc_defaults():
    g = generator(21)
    logit = torch.randn(3, 10, generator=g)
    target = (torch.rand(3, 10, generator=g) < 0.5).float()
    torch.testing.assert_close(sigmoid_focal_loss(logit, target).double(),
                               focal_direct(logit, target, 0.5, 2.0).mean(), rtol=1e-5, atol=1e-7)
    assert torch.equal(SigmoidFocalLoss()(logit, target), sigmoid_focal_loss(logit, target))


def test_focal_gamma0_alpha_half_is_half_bce():
    g = generator(22)
    logit = torch.randn(4, 1, 6, 6, generator=g) * 5
    target = (torch.rand(4, 1, 6, 6, generator=g) < 0.4).float()
    got = sigmoid_focal_loss(logit, target, alpha=0.5, gamma=0.0)
    torch.testing.assert_close(got, 0.5 * F.binary_cross_entropy_with_logits(logit, target),
                               rtol=1e-6, atol=1e-7)


def test_focal_large_logits_and_valid():
    logit = torch.tensor([[40.0, -40.0, 200.0, -200.0, 0.3, 1.0]], requires_grad=True)
    target = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0, 0.0]])
    valid = torch.tensor([[True, True, True, True, True, False]])
    loss = sigmoid_focal_loss(logit, target, valid=valid)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logit.grad).all()
    assert logit.grad[0, 5] == 0  # a padded pixel gets no gradient
    # well-classified pixels (+-200 on the right side) contribute ~0; badly classified ones
    # (+-40 on the wrong side) ~ 0.5 * 40 each; mean over the 5 valid pixels
    expected = (0.5 * 40 * 2 + focal_direct(logit[0, 4:5].detach(), target[0, 4:5], 0.5,
                                            2.0).sum().item()) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_focal_half_logits_give_float32():
    logit = torch.randn(2, 8).bfloat16()
    target = (torch.rand(2, 8) < 0.5).float()
    got = sigmoid_focal_loss(logit, target)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), focal_direct(logit.float(), target, 0.5,
                                                          2.0).mean(), rtol=1e-5, atol=1e-7)
