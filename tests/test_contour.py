"""fastiml.ops.contour_mine and contour_band against fastiml.reference (DESIGN 2.2, STYLE 11).

``contour_mine`` classifies the p x p cells of a mask (0 authentic: frac <= lo, 1 tampered:
frac >= hi, 2 contour, -1 no valid pixel); ``contour_band`` marks the valid pixels whose
(2r+1)^2 window holds both a tampered and an authentic valid pixel (float masks split at 0.5).
Both are compared with the plain-PyTorch reference (zero-padded sum pooling, max-pool dilation)
on random and adversarial masks, every accepted mask dtype, odd grids and padding, and checked
by hand on small cases where the answer is known.
"""
import pytest
import torch

from conftest import generator
from fastiml import ops, reference


@pytest.fixture(autouse=True)
def _one_thread(num_threads):
    """One intra-op thread by default: on a loaded 2-core machine a parallel region around a
    microsecond of work can cost tens of milliseconds. The tests parametrised over ``threads`` run
    the parallel paths with two threads."""
    num_threads(1)


MASK_KINDS = ["bool", "uint8_01", "uint8_255", "float32", "float64", "float16", "bfloat16"]

# (H, W, p): multiples, H/W not multiples of p, p = 1, p larger than the image, p equal to it.
SHAPES = [(16, 16, 4), (13, 17, 4), (11, 7, 3), (7, 9, 1), (5, 6, 8), (6, 6, 6), (1, 1, 1),
          (12, 5, 5)]


def rect_mask(b, h, w, g, rects=2):
    """A bool mask of random rectangles (so that every patch class appears) plus sparse noise."""
    m = torch.zeros(b, h, w, dtype=torch.bool)
    for i in range(b):
        for _ in range(rects):
            y0, x0 = (int(torch.randint(0, s, (1,), generator=g)) for s in (h, w))
            y1 = y0 + int(torch.randint(1, h + 1, (1,), generator=g))
            x1 = x0 + int(torch.randint(1, w + 1, (1,), generator=g))
            m[i, y0:y1, x0:x1] = True
    m ^= torch.rand(b, h, w, generator=g) < 0.03
    return m


def as_kind(m: torch.Tensor, kind: str, g) -> torch.Tensor:
    """The bool mask ``m`` in one of the accepted encodings; float kinds are soft: exact 0 and 1
    in most pixels (so whole cells are exactly authentic/tampered) and random values elsewhere."""
    if kind == "bool":
        return m
    if kind == "uint8_01":
        return m.to(torch.uint8)
    if kind == "uint8_255":
        return m.to(torch.uint8) * 255
    dtype = getattr(torch, kind)
    soft = torch.rand(m.shape, generator=g, dtype=torch.float64)
    hard = torch.rand(m.shape, generator=g) < 0.7
    out = torch.where(hard, m.double(), soft)
    return out.to(dtype)


def assert_mine_equal(mask, patch, **kw):
    frac, klass = ops.contour_mine(mask, patch, **kw)
    ref_kw = dict(kw)
    if ref_kw.get("valid") is not None:
        ref_kw["valid"] = ref_kw["valid"].cpu()
    rfrac, rklass = reference.contour_mine(mask.cpu(), patch, **ref_kw)
    b, h, w = mask.shape[0], mask.shape[-2], mask.shape[-1]
    grid = (b, -(-h // patch), -(-w // patch))
    assert frac.dtype == torch.float32 and klass.dtype == torch.int8
    assert tuple(frac.shape) == grid and tuple(klass.shape) == grid
    assert frac.device == mask.device and klass.device == mask.device
    torch.testing.assert_close(frac.cpu(), rfrac, rtol=1e-6, atol=1e-6)
    assert torch.equal(klass.cpu(), rklass), (klass.cpu(), rklass)
    return frac.cpu(), klass.cpu()


def assert_klass_consistent(frac, klass, lo=0.0, hi=1.0, padding=None):
    """klass is the documented function of frac (and of which cells are all padding)."""
    expected = torch.full_like(klass, 2)
    expected[frac >= torch.tensor(hi, dtype=torch.float32)] = 1
    expected[frac <= torch.tensor(lo, dtype=torch.float32)] = 0
    if padding is not None:
        expected[padding] = -1
    assert torch.equal(klass, expected)


# -------------------------------------------------------------------------- contour_mine

@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("h,w,p", SHAPES)
def test_mine_matches_reference(kind, h, w, p, device):
    g = generator(h * 100 + w * 10 + p)
    mask = as_kind(rect_mask(3, h, w, g), kind, g).to(device)
    frac, klass = assert_mine_equal(mask, p)
    assert_klass_consistent(frac, klass)
    assert ((frac >= 0) & (frac <= 1)).all()


@pytest.mark.parametrize("kind", ["bool", "uint8_255", "float32"])
def test_mine_classes_by_hand(kind):
    """One 8 x 8 image, p = 4: an authentic cell, a tampered one, and two contour cells."""
    m = torch.zeros(1, 8, 8, dtype=torch.bool)
    m[0, 0:4, 4:8] = True          # cell (0, 1) tampered
    m[0, 4:6, 0:4] = True          # cell (1, 0): 8 of 16 tampered
    m[0, 7, 7] = True              # cell (1, 1): 1 of 16
    frac, klass = ops.contour_mine(as_kind(m, kind, generator()) if kind != "float32"
                                   else m.float(), 4)
    torch.testing.assert_close(frac, torch.tensor([[[0.0, 1.0], [0.5, 1 / 16]]]))
    assert klass.tolist() == [[[0, 1], [2, 2]]]


@pytest.mark.parametrize("kind", ["bool", "uint8_01", "uint8_255", "float32"])
@pytest.mark.parametrize("h,w,p", [(16, 16, 4), (13, 17, 4), (7, 9, 1), (5, 6, 8), (6, 6, 6)])
def test_mine_adversarial_masks(kind, h, w, p):
    g = generator()
    gh, gw = -(-h // p), -(-w // p)
    zeros = torch.zeros(2, h, w, dtype=torch.bool)
    # All authentic / all tampered.
    for m, cls in ((zeros, 0), (~zeros, 1)):
        frac, klass = assert_mine_equal(as_kind(m, kind, g) if kind != "float32" else m.float(), p)
        assert (klass == cls).all() and (frac == float(cls)).all()
    # One tampered pixel in an authentic image, one authentic pixel in a tampered image.
    y, x = h - 1, w // 2
    cy, cx = y // p, x // p
    cell = (min(p, h - cy * p)) * (min(p, w - cx * p))
    for base, pixel_value, frac_value in ((False, True, 1 / cell), (True, False, 1 - 1 / cell)):
        m = torch.full((2, h, w), base, dtype=torch.bool)
        m[1, y, x] = pixel_value
        mk = as_kind(m, kind, g) if kind != "float32" else m.float()
        frac, klass = assert_mine_equal(mk, p)
        assert (klass[0] == int(base)).all()
        if cell == 1:  # p = 1 (or a 1-pixel corner cell): the cell is that pixel alone
            assert klass[1, cy, cx] == int(pixel_value)
        else:
            assert klass[1, cy, cx] == 2
            assert frac[1, cy, cx].item() == pytest.approx(frac_value, rel=1e-6)
        others = torch.ones(gh, gw, dtype=torch.bool)
        others[cy, cx] = False
        assert (klass[1][others] == int(base)).all()


def test_mine_patch_larger_than_and_equal_to_image():
    m = torch.zeros(2, 5, 7, dtype=torch.bool)
    m[0, :2, :] = True  # 14 of 35 pixels
    for p in (7, 8, 100):
        frac, klass = ops.contour_mine(m, p)
        assert frac.shape == (2, 1, 1)
        assert frac[0, 0, 0].item() == pytest.approx(14 / 35, rel=1e-6) and klass[0, 0, 0] == 2
        assert frac[1, 0, 0] == 0 and klass[1, 0, 0] == 0
    frac, klass = ops.contour_mine(m, 5)  # p = H: one row of cells, the last one partial
    assert frac.shape == (2, 1, 2)
    torch.testing.assert_close(frac[0], torch.tensor([[10 / 25, 4 / 10]]))


@pytest.mark.parametrize("kind", ["bool", "uint8_255", "float32", "float64"])
@pytest.mark.parametrize("h,w,p", [(16, 16, 4), (13, 17, 4), (9, 11, 1), (10, 10, 12)])
def test_mine_valid_padding_matches_reference(kind, h, w, p, device):
    g = generator(7)
    mask = as_kind(rect_mask(3, h, w, g), kind, g)
    valid = torch.rand(3, h, w, generator=g) < 0.6   # arbitrary holes
    valid[1] = False                                  # an image that is all padding
    valid[2] = False
    valid[2, : max(1, h // 2), : max(1, w - 3)] = True  # zero padding on the bottom/right
    mask, valid = mask.to(device), valid.to(device)
    frac, klass = assert_mine_equal(mask, p, valid=valid)
    assert (klass[1] == -1).all() and (frac[1] == 0).all()


def test_mine_whole_padding_cells_by_hand():
    """A 6 x 6 image zero-padded to 8 x 12, p = 4: cells entirely in the padding are -1 with
    frac 0 even where the (garbage) mask is tampered; partial cells count valid pixels only."""
    mask = torch.ones(1, 8, 12, dtype=torch.bool)  # tampered everywhere, padding included
    mask[0, :6, :6] = False
    mask[0, 0, 0] = True
    valid = torch.zeros(1, 8, 12, dtype=torch.bool)
    valid[0, :6, :6] = True
    frac, klass = ops.contour_mine(mask, 4, valid=valid)
    assert klass.tolist() == [[[2, 0, -1], [0, 0, -1]]]
    torch.testing.assert_close(frac, torch.tensor([[[1 / 16, 0.0, 0.0], [0.0, 0.0, 0.0]]]))
    # valid given as B x 1 x H x W is the same thing
    frac4, klass4 = ops.contour_mine(mask, 4, valid=valid[:, None])
    assert torch.equal(frac4, frac) and torch.equal(klass4, klass)
    # without valid the padding counts as tampered
    _, klass_all = ops.contour_mine(mask, 4)
    assert klass_all.tolist() == [[[2, 2, 1], [2, 2, 1]]]


@pytest.mark.parametrize("lo,hi", [(0.1, 0.9), (0.25, 0.75), (0.0, 0.5), (0.5, 1.0)])
@pytest.mark.parametrize("kind", ["bool", "uint8_01", "float32"])
def test_mine_thresholds_inclusive(lo, hi, kind):
    """Fractions exactly on lo are authentic and exactly on hi tampered (p = 10: k/100 is the
    float32 nearest to the decimal, like the threshold)."""
    counts = list(range(0, 101, 5))
    m = torch.zeros(1, 10, 10 * len(counts), dtype=torch.bool)
    for i, c in enumerate(counts):
        block = torch.zeros(100, dtype=torch.bool)
        block[:c] = True
        m[0, :, 10 * i:10 * i + 10] = block.view(10, 10)
    mk = as_kind(m, kind, generator()) if kind != "float32" else m.float()
    frac, klass = assert_mine_equal(mk, 10, lo=lo, hi=hi)
    expected = [0 if c / 100 <= lo else 1 if c / 100 >= hi else 2 for c in counts]
    assert klass[0, 0].tolist() == expected
    assert_klass_consistent(frac, klass, lo, hi)


@pytest.mark.parametrize("lo,hi", [(0.1, 0.9), (0.3, 0.6)])
def test_mine_thresholds_random_soft(lo, hi):
    g = generator(3)
    mask = as_kind(rect_mask(4, 23, 19, g), "float32", g)
    frac, klass = assert_mine_equal(mask, 3, lo=lo, hi=hi)
    assert_klass_consistent(frac, klass, lo, hi)
    assert set(klass.unique().tolist()) == {0, 1, 2}


def test_mine_accepts_b1hw_and_non_contiguous():
    g = generator(5)
    mask = rect_mask(2, 14, 10, g)
    frac, klass = ops.contour_mine(mask, 4)
    frac4, klass4 = ops.contour_mine(mask[:, None], 4)
    assert torch.equal(frac4, frac) and torch.equal(klass4, klass)
    # a transposed (non-contiguous) view gives the transposed grid
    t = mask.transpose(1, 2).contiguous().transpose(1, 2)
    assert not t.is_contiguous()
    frac_t, klass_t = ops.contour_mine(t, 4)
    assert torch.equal(frac_t, frac) and torch.equal(klass_t, klass)
    sliced = rect_mask(2, 28, 10, g)[:, ::2]
    assert_mine_equal(sliced, 3)


@pytest.mark.parametrize("with_valid", [False, True])
@pytest.mark.parametrize("kind", ["bool", "uint8_255", "float32"])
def test_mine_empty_batch(kind, with_valid):
    mask = as_kind(torch.zeros(0, 9, 7, dtype=torch.bool), kind, generator())
    valid = torch.zeros(0, 9, 7, dtype=torch.bool) if with_valid else None
    frac, klass = ops.contour_mine(mask, 4, valid=valid)
    assert frac.shape == (0, 3, 2) and klass.shape == (0, 3, 2)
    assert frac.dtype == torch.float32 and klass.dtype == torch.int8


@pytest.mark.parametrize("threads", [1, 2])
def test_mine_large_image_many_tasks(threads, num_threads):
    """Enough rows of cells for several parallel tasks; uint8 and float agree with bool."""
    num_threads(threads)
    g = generator(11)
    m = rect_mask(2, 301, 257, g, rects=6)
    f_bool, k_bool = assert_mine_equal(m, 8)
    f_u8, k_u8 = ops.contour_mine(m.to(torch.uint8) * 255, 8)
    f_f, k_f = ops.contour_mine(m.float(), 8)
    assert torch.equal(f_u8, f_bool) and torch.equal(k_u8, k_bool)
    assert torch.equal(f_f, f_bool) and torch.equal(k_f, k_bool)


def test_mine_opcheck():
    g = generator(2)
    m = rect_mask(2, 9, 11, g)
    valid = torch.rand(2, 9, 11, generator=g) < 0.8
    for args in ((m, 4, 0.0, 1.0, None), (m.float(), 3, 0.1, 0.9, valid),
                 (m.to(torch.uint8), 1, 0.0, 1.0, None)):
        torch.library.opcheck(torch.ops.fastiml.contour_mine.default, args)


def test_mine_and_band_torch_compile_fullgraph():
    g = generator(4)
    m = rect_mask(2, 12, 10, g)

    def fn(mask):
        frac, klass = ops.contour_mine(mask, 4, lo=0.1, hi=0.9)
        return frac * 2, klass, ops.contour_band(mask, 1)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(m), fn(m)):
        assert torch.equal(got, want)


# -------------------------------------------------------------------------- contour_band

@pytest.mark.parametrize("kind", ["bool", "uint8_01", "uint8_255", "float32", "float64",
                                  "float16"])
@pytest.mark.parametrize("radius", [0, 1, 3, 40])
@pytest.mark.parametrize("h,w", [(16, 16), (13, 17), (1, 9), (5, 1)])
def test_band_matches_reference(kind, radius, h, w, device):
    g = generator(h * 31 + w + radius)
    mask = as_kind(rect_mask(3, h, w, g), kind, g).to(device)
    band = ops.contour_band(mask, radius)
    assert band.dtype == torch.bool and band.shape == (3, h, w) and band.device == mask.device
    assert torch.equal(band.cpu(), reference.contour_band(mask.cpu(), radius))
    if radius == 0:
        assert not band.any()


@pytest.mark.parametrize("radius", [1, 2, 30])
@pytest.mark.parametrize("kind", ["bool", "uint8_255", "float32"])
def test_band_with_valid_matches_reference(kind, radius, device):
    g = generator(radius)
    mask = as_kind(rect_mask(3, 15, 12, g), kind, g)
    valid = torch.rand(3, 15, 12, generator=g) < 0.7
    valid[1] = False
    valid[1, :9, :8] = True
    valid[2] = False
    mask, valid = mask.to(device), valid.to(device)
    band = ops.contour_band(mask, radius, valid=valid)
    assert torch.equal(band.cpu(), reference.contour_band(mask.cpu(), radius,
                                                           valid=valid.cpu()))
    assert not band[~valid].any() and not band[2].any()
    band4 = ops.contour_band(mask[:, None], radius, valid=valid[:, None])
    assert torch.equal(band4, band)


def test_band_by_hand():
    m = torch.zeros(1, 7, 7, dtype=torch.bool)
    m[0, 3, 3] = True
    band = ops.contour_band(m, 1)
    expected = torch.zeros(1, 7, 7, dtype=torch.bool)
    expected[0, 2:5, 2:5] = True
    assert torch.equal(band, expected)
    # radius larger than the image: every pixel sees both classes
    assert ops.contour_band(m, 50).all()
    # a uniform mask has no boundary at any radius
    assert not ops.contour_band(torch.ones(2, 4, 5, dtype=torch.bool), 3).any()
    # padding: the only tampered pixel is invalid, so there is no boundary
    valid = torch.ones(1, 7, 7, dtype=torch.bool)
    valid[0, 3, 3] = False
    assert not ops.contour_band(m, 2, valid=valid).any()


def test_band_soft_masks_split_at_half():
    m = torch.full((1, 1, 9), 0.49)
    m[0, 0, 4] = 0.5  # exactly 0.5 is tampered
    band = ops.contour_band(m, 1)
    assert band[0, 0].tolist() == [False] * 3 + [True] * 3 + [False] * 3
    assert torch.equal(band, reference.contour_band(m, 1))
    m[0, 0, 4] = 0.4999
    assert not ops.contour_band(m, 1).any()
    m16 = torch.full((1, 1, 9), 0.49, dtype=torch.float16)
    m16[0, 0, 4] = 0.5
    assert torch.equal(ops.contour_band(m16, 1), band)


def test_band_float64_mask_split_exactly_at_half():
    """Regression: float64 masks were once rounded to float32 before the 0.5 split, so
    0.4999999999 counted as tampered."""
    m = torch.zeros(1, 1, 4, dtype=torch.float64)
    m[0, 0, 0] = 0.4999999999
    assert not ops.contour_band(m, 1).any()
    assert torch.equal(ops.contour_band(m, 1), reference.contour_band(m, 1))


@pytest.mark.parametrize("threads", [1, 2])
def test_band_wide_image_spans_several_strips(threads, num_threads):
    """More than 256 columns: the column pass runs over several strips (and tasks)."""
    num_threads(threads)
    g = generator(9)
    m = rect_mask(2, 6, 600, g, rects=8)
    for r in (1, 2, 7):
        assert torch.equal(ops.contour_band(m, r), reference.contour_band(m, r))


def test_band_empty_batch():
    band = ops.contour_band(torch.zeros(0, 5, 6, dtype=torch.uint8), 2)
    assert band.shape == (0, 5, 6) and band.dtype == torch.bool


def test_band_opcheck():
    g = generator(3)
    m = rect_mask(2, 9, 11, g)
    valid = torch.rand(2, 9, 11, generator=g) < 0.8
    for args in ((m, 1, None), (m.float(), 3, valid), (m.to(torch.uint8), 0, None)):
        torch.library.opcheck(torch.ops.fastiml.contour_band.default, args)


# ----------------------------------------------------------------------------- bad inputs

M = torch.zeros(2, 8, 8, dtype=torch.bool)


def _u8(v):
    t = torch.zeros(2, 8, 8, dtype=torch.uint8)
    t[0, 0, 0] = v
    return t


def _f(v):
    t = torch.zeros(2, 8, 8)
    t[1, 2, 3] = v
    return t


MINE_BAD = [
    (dict(mask=_u8(128)), ValueError, "mask"),
    (dict(mask=_u8(2)), ValueError, "mask"),
    (dict(mask=_f(1.5)), ValueError, "mask"),
    (dict(mask=_f(-0.1)), ValueError, "mask"),
    (dict(mask=_f(float("nan"))), ValueError, "mask"),
    (dict(mask=torch.zeros(2, 8, 8, dtype=torch.int32)), TypeError, "mask"),
    (dict(mask=torch.zeros(2, 8, 8, dtype=torch.int64)), TypeError, "mask"),
    (dict(mask=M.numpy()), TypeError, "mask"),
    (dict(mask=torch.zeros(8, 8, dtype=torch.bool)), ValueError, "mask"),
    (dict(mask=torch.zeros(2, 3, 8, 8, dtype=torch.bool)), ValueError, "mask"),
    (dict(mask=torch.zeros(1, 2, 1, 8, 8, dtype=torch.bool)), ValueError, "mask"),
    (dict(patch=0), ValueError, "patch"),
    (dict(patch=-2), ValueError, "patch"),
    (dict(patch=2.0), ValueError, "patch"),
    (dict(patch=True), ValueError, "patch"),
    (dict(lo=0.5, hi=0.5), ValueError, "lo"),
    (dict(lo=0.7, hi=0.2), ValueError, "lo"),
    (dict(lo=-0.1), ValueError, "lo"),
    (dict(hi=1.5), ValueError, "hi"),
    (dict(valid=torch.ones(2, 8, 7, dtype=torch.bool)), ValueError, "valid"),
    (dict(valid=torch.ones(1, 8, 8, dtype=torch.bool)), ValueError, "valid"),
    (dict(valid=torch.ones(2, 8, 8, dtype=torch.uint8)), TypeError, "valid"),
    (dict(valid=torch.ones(2, 8, 8)), TypeError, "valid"),
]


@pytest.mark.parametrize("kwargs,error,match", MINE_BAD)
def test_mine_bad_inputs_raise_naming_the_argument(kwargs, error, match):
    args = dict(mask=M, patch=4)
    args.update(kwargs)
    mask, patch = args.pop("mask"), args.pop("patch")
    with pytest.raises(error, match=match):
        ops.contour_mine(mask, patch, **args)


BAND_BAD = [(kw, e, m) for kw, e, m in MINE_BAD if "patch" not in kw and "lo" not in kw
            and "hi" not in kw] + [
    (dict(radius=-1), ValueError, "radius"),
    (dict(radius=1.0), ValueError, "radius"),
    (dict(radius=None), ValueError, "radius"),
]


@pytest.mark.parametrize("kwargs,error,match", BAND_BAD)
def test_band_bad_inputs_raise_naming_the_argument(kwargs, error, match):
    args = dict(mask=M, radius=1)
    args.update(kwargs)
    mask, radius = args.pop("mask"), args.pop("radius")
    with pytest.raises(error, match=match):
        ops.contour_band(mask, radius, **args)


def test_raw_ops_check_their_inputs():
    """The compiled ops refuse what the Python layer would have refused (RuntimeError)."""
    with pytest.raises(RuntimeError, match="mask"):
        torch.ops.fastiml.contour_mine(torch.zeros(8, 8, dtype=torch.bool), 4, 0.0, 1.0, None)
    with pytest.raises(RuntimeError, match="patch"):
        torch.ops.fastiml.contour_mine(M, 0, 0.0, 1.0, None)
    with pytest.raises(RuntimeError, match="lo"):
        torch.ops.fastiml.contour_mine(M, 4, 0.6, 0.5, None)
    with pytest.raises(RuntimeError, match="valid"):
        torch.ops.fastiml.contour_mine(M, 4, 0.0, 1.0, torch.ones(2, 8, 8))
    with pytest.raises(RuntimeError, match="radius"):
        torch.ops.fastiml.contour_band(M, -1, None)
