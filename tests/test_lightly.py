"""fastiml.losses.lightly (NTXentLoss with and without a memory bank, DCLLoss, DCLWLoss) against
lightly's own classes (lightly 1.5.26, a test-only dependency): values and gradients in float64
(lightly's memory bank is float32: both modules are moved to float64 with ``.double()``), the
bank's initial draw and its FIFO state step by step, negative temperatures, two gloo ranks
with gather_distributed, half inputs against the float64 result, argument errors, the
benchmark's cases; and lightly's own test files
``tests/loss/test_ntx_ent_loss.py`` and ``test_dcl_loss.py`` run with fastiml's classes standing
in, given a lightly checkout (v1.5.26) at $FASTIML_LIGHTLY_REPO.
"""
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_close_half_rule, assert_close_scaled, float32_arg_error, generator
from fastiml.losses import lightly as fl

# lightly's package __init__ starts a version check against its web API (it imports requests)
# unless told it already ran; its own test suite sets the same variable.
os.environ.setdefault("LIGHTLY_DID_VERSION_CHECK", "True")

REL = 1e-9
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ll():
    """lightly.loss (skipped where lightly is not installed)."""
    return pytest.importorskip("lightly.loss")


def value_and_grads(fn, *inputs, requires_grad=(True, True)):
    leaves = [x.detach().clone().requires_grad_(r) for x, r in zip(inputs, requires_grad)]
    loss = fn(*leaves)
    wanted = [x for x in leaves if x.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, wanted) if wanted else ()


def assert_same(ours, theirs, rtol=REL, name=""):
    assert_close_scaled(ours[0], theirs[0], rtol, f"{name} loss")
    assert len(ours[1]) == len(theirs[1])
    for i, (a, b) in enumerate(zip(ours[1], theirs[1])):
        assert_close_scaled(a, b, rtol, f"{name} grad {i}")


def views(b, d=16, seed=0, dtype=torch.float64):
    g = generator(seed)
    return (torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype))


# --------------------------------------------------------------------- NTXent, no bank

# B = 150: 300 rows, across a 256-row tile of pair_stats.
@pytest.mark.parametrize("b", [1, 6, 150])
@pytest.mark.parametrize("temperature", [0.5, 0.07, -0.4])
def test_ntxent_matches_lightly(b, temperature, ll):
    out0, out1 = views(b, seed=b)
    ours = value_and_grads(fl.NTXentLoss(temperature), out0, out1)
    theirs = value_and_grads(ll.NTXentLoss(temperature), out0, out1)
    assert ours[0].dtype == torch.float64
    assert_same(ours, theirs, name=f"B={b} T={temperature}")


def test_ntxent_float32_matches_lightly(ll):
    """float32: both round the similarities (|s| <= 1 / T) and sum 2B - 1 exponentials; the
    loss is a difference of log-sum-exps, its error that of their arguments: a few eps32 / T."""
    out0, out1 = views(64, dtype=torch.float32)
    ours = value_and_grads(fl.NTXentLoss(0.1), out0, out1)
    theirs = value_and_grads(ll.NTXentLoss(0.1), out0, out1)
    assert ours[0].dtype == torch.float32
    assert_same(ours, theirs, rtol=4 * float32_arg_error(1 / 0.1, 128))


def test_negative_temperature_is_not_the_positive_one(ll):
    """The sign matters (a loss that used |T| would pass the symmetry tests of lightly's own
    suite): with views close to each other, T = -0.4 pushes the positive to the bottom of the
    softmax, T = 0.4 to the top; T = -0.4 equals lightly's."""
    out0, noise = views(8)
    out1 = out0 + 0.1 * noise
    neg, pos = fl.NTXentLoss(-0.4)(out0, out1), fl.NTXentLoss(0.4)(out0, out1)
    assert neg.item() > pos.item() + 3
    assert_close_scaled(neg, ll.NTXentLoss(-0.4)(out0, out1), REL)


# --------------------------------------------------------------------- NTXent, memory bank

def bank_state(loss):
    return loss.memory_bank.bank.detach().clone(), int(loss.memory_bank.bank_ptr)


# (batch size, mode) per step on a bank of K = 40: the FIFO fills 0-11, 12-23, 24-35, then a
# batch of 4 fills it exactly (pointer back to 0), 12 more; a step whose out0 needs no grad and
# one under no_grad read the bank without updating it; then 24-35 and a batch of 12 at 36
# fills rows 36-39, drops its last 8 rows and wraps.
BANK_STEPS = [(12, "grad"), (12, "grad"), (12, "grad"), (4, "grad"), (12, "grad"),
              (12, "out0_no_grad"), (12, "no_grad"), (12, "grad"), (12, "grad"), (12, "grad")]
BANK_POINTERS = [12, 24, 36, 0, 12, 12, 12, 24, 36, 0]


@pytest.mark.parametrize("size_form", ["tuple", "int"])
@pytest.mark.parametrize("temperature", [0.2, -0.5])
def test_memory_bank_matches_lightly_over_steps(size_form, temperature, ll):
    """Value, gradients, bank and pointer equal lightly's after every step of BANK_STEPS. The
    same global seed gives both modules the same initial bank (drawn at construction for a
    (K, dim) size, at the first batch for an int K)."""
    k, d = 40, 16
    size = (k, d) if size_form == "tuple" else k
    modules = []
    for m in (ll, fl):
        torch.manual_seed(3)
        # lightly warns that an int size leaves the feature dimension to the first batch
        with pytest.warns(UserWarning, match="feature dimension") if size_form == "int" \
                else contextlib.nullcontext():
            modules.append(m.NTXentLoss(temperature, memory_bank_size=size).double())
    theirs, ours = modules
    if size_form == "tuple":
        assert torch.equal(ours.memory_bank.bank, theirs.memory_bank.bank)
    for step, ((b, mode), pointer) in enumerate(zip(BANK_STEPS, BANK_POINTERS)):
        out0, out1 = views(b, d, seed=10 + step)
        results = []
        for loss in (theirs, ours):
            torch.manual_seed(5)  # the int-size bank is drawn here, at the first batch
            if mode == "no_grad":
                with torch.no_grad():
                    results.append((loss(out0, out1), ()))
            else:
                results.append(value_and_grads(loss, out0, out1,
                                               requires_grad=(mode == "grad", True)))
        assert_same(results[1], results[0], name=f"step {step} ({mode})")
        (bank_t, ptr_t), (bank_o, ptr_o) = bank_state(theirs), bank_state(ours)
        assert ptr_o == ptr_t == pointer, f"step {step}: bank_ptr {ptr_o}, lightly's {ptr_t}"
        assert torch.equal(bank_o, bank_t), f"step {step}: bank differs from lightly's"


def test_memory_bank_state_copied_over(ll):
    """lightly's bank and pointer copied into fastiml's (different seeds): same values."""
    torch.manual_seed(1)
    theirs = ll.NTXentLoss(0.1, memory_bank_size=(30, 8)).double()
    torch.manual_seed(2)
    ours = fl.NTXentLoss(0.1, memory_bank_size=(30, 8)).double()
    for step in range(2):  # lightly's state moves on
        theirs(*[x.requires_grad_() for x in views(7, 8, seed=step)])
    ours.memory_bank.bank = theirs.memory_bank.bank.clone()
    ours.memory_bank.bank_ptr = theirs.memory_bank.bank_ptr.clone()
    out0, out1 = views(7, 8, seed=9)
    assert_same(value_and_grads(ours, out0, out1), value_and_grads(theirs, out0, out1))
    assert int(ours.memory_bank.bank_ptr) == int(theirs.memory_bank.bank_ptr) == 21


def test_memory_bank_two_forwards_one_backward(ll):
    """Gradient accumulation: the second forward's update overwrites the bank the first graph
    read; the first graph's gradient must still be lightly's."""
    torch.manual_seed(4)
    theirs = ll.NTXentLoss(0.3, memory_bank_size=(10, 8)).double()
    torch.manual_seed(4)
    ours = fl.NTXentLoss(0.3, memory_bank_size=(10, 8)).double()
    a0, a1 = views(6, 8, seed=1)
    c0, c1 = views(6, 8, seed=2)
    both = lambda loss: lambda x0, x1, y0, y1: loss(x0, x1) + 2 * loss(y0, y1)  # noqa: E731
    assert_same(value_and_grads(both(ours), a0, a1, c0, c1, requires_grad=(True,) * 4),
                value_and_grads(both(theirs), a0, a1, c0, c1, requires_grad=(True,) * 4))
    assert torch.equal(ours.memory_bank.bank, theirs.memory_bank.bank)


def test_memory_bank_is_updated_in_place_between_steps():
    """The usual loop (forward, backward, next forward) never copies the bank: the update is
    written into the same storage."""
    loss_fn = fl.NTXentLoss(0.1, memory_bank_size=(64, 8))
    storage = loss_fn.memory_bank.bank.data_ptr()
    for step in range(5):
        out0, out1 = views(16, 8, seed=step, dtype=torch.float32)
        loss_fn(out0.requires_grad_(), out1).backward()
        assert loss_fn.memory_bank.bank.data_ptr() == storage, f"bank copied at step {step}"
    assert int(loss_fn.memory_bank.bank_ptr) == 16  # 5 batches of 16 in a FIFO of 64


def test_memory_bank_retained_graph_keeps_its_gradient_after_a_later_update():
    """A graph backpropagated again after the next step's in-place update of the bank: its
    backward saved the softmax-weighted mean, not the bank, so the second gradient is the
    first (the rows the forward read), not one computed from the new rows."""
    loss_fn = fl.NTXentLoss(0.1, memory_bank_size=(8, 4))
    out0, out1 = views(4, 4, seed=0, dtype=torch.float32)
    out0.requires_grad_()
    first = loss_fn(out0, out1)
    (grad_before,) = torch.autograd.grad(first, [out0], retain_graph=True)
    bank_before = loss_fn.memory_bank.bank.clone()
    next0, next1 = views(4, 4, seed=1, dtype=torch.float32)
    loss_fn(next0.requires_grad_(), next1)  # writes step 1's batch in place
    assert not torch.equal(loss_fn.memory_bank.bank, bank_before)
    (grad_after,) = torch.autograd.grad(first, [out0])
    assert torch.equal(grad_after, grad_before)


def test_memory_bank_correlated_embedding_limit():
    """Once the bank is full of copies of the positive's direction, every logit is 1 / T and
    the loss is log(K + 1) (lightly's own test_with_correlated_embedding, in float64)."""
    k = 17
    loss_fn = fl.NTXentLoss(0.1, memory_bank_size=(k, 2)).double()
    x = torch.rand(16, 1, dtype=torch.float64)
    out = torch.cat([x, 2 * x], 1).requires_grad_()
    for _ in range(3):
        loss = loss_fn(out, out.detach())
    assert loss.item() == pytest.approx(math.log(k + 1), abs=1e-12)


# ----------------------------------------------------------------------- DCL / DCLW

def asymmetric_weights(a, b):
    """A weight function whose two calls differ (weight_fn(out1, out0) != weight_fn(out0, out1))
    and that carries a gradient."""
    return 1 + a[:, 0] ** 2 + 0.5 * (a * b).sum(1)


@pytest.mark.parametrize("b", [2, 5, 150])
@pytest.mark.parametrize("temperature", [0.1, -0.3])
@pytest.mark.parametrize("kind", ["plain", "asymmetric_weight", "dclw", "dclw_sigma2"])
def test_dcl_matches_lightly(b, temperature, kind, ll):
    out0, out1 = views(b, seed=20 + b)
    make = {"plain": lambda m: m.DCLLoss(temperature),
            "asymmetric_weight": lambda m: m.DCLLoss(temperature, weight_fn=asymmetric_weights),
            "dclw": lambda m: m.DCLWLoss(temperature),
            "dclw_sigma2": lambda m: m.DCLWLoss(temperature, sigma=2.0)}[kind]
    ours = value_and_grads(make(fl), out0, out1)
    with pytest.warns(UserWarning) if kind.startswith("dclw") else contextlib.nullcontext():
        theirs = value_and_grads(make(ll), out0, out1)  # lightly's torch.tensor(tensor) warns
    assert_same(ours, theirs, name=f"{kind} B={b} T={temperature}")


def test_dcl_single_pair_has_no_negative(ll):
    out0, out1 = views(1)
    assert fl.DCLLoss()(out0, out1).item() == float("-inf") == ll.DCLLoss()(out0, out1).item()


def test_mises_fisher_weights_match_lightly(ll):
    from lightly.loss.dcl_loss import negative_mises_fisher_weights as theirs
    out0, out1 = views(9)
    out0.requires_grad_()
    for sigma in (1e-7, 0.5, 1e4):
        w = fl.negative_mises_fisher_weights(out0, out1, sigma)
        assert not w.requires_grad
        with pytest.warns(UserWarning):
            assert_close_scaled(w, theirs(out0, out1, sigma), REL, f"sigma={sigma}")


# ----------------------------------------------------------------------- half inputs

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_name", ["ntxent", "ntxent_bank", "dcl"])
def test_half_inputs_give_float32(dtype, loss_name, ll):
    """Half views: a float32 loss (lightly's NTXent returns the half dtype, and fails with its
    float32 bank), within the low-precision rule of lightly's float64 value on the same
    inputs: the rows are normalised in the half dtype (each similarity off by up to eps * S)."""
    temperature = 0.2
    out0, out1 = views(32, dtype=dtype)
    make = {"ntxent": lambda m: m.NTXentLoss(temperature),
            "ntxent_bank": lambda m: m.NTXentLoss(temperature, memory_bank_size=(64, 16)),
            "dcl": lambda m: m.DCLLoss(temperature)}[loss_name]
    torch.manual_seed(0)
    ours = make(fl)(out0, out1)
    torch.manual_seed(0)
    exact = make(ll).double()(out0.double(), out1.double())
    assert ours.dtype == torch.float32
    span = 1 / temperature
    arg_error = float32_arg_error(span, 64 + 64) + torch.finfo(dtype).eps * span
    assert_close_half_rule(ours, exact, torch.float32, loss_name, arg_error=arg_error,
                           log_domain=True)


# ------------------------------------------------------------------------ bad arguments

def test_argument_errors(monkeypatch):
    for bad in (0.0, 1e-9, -5e-9, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            fl.NTXentLoss(temperature=bad)
    fl.NTXentLoss(temperature=-1e-8)  # lightly's limit: abs(T) < 1e-8 is the error
    with pytest.raises(TypeError, match="temperature"):
        fl.NTXentLoss(temperature=True)
    for bad in (0.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            fl.DCLLoss(temperature=bad)
    with pytest.raises(ValueError, match="sigma"):
        fl.DCLWLoss(sigma=0.0)
    with pytest.raises(TypeError, match="weight_fn"):
        fl.DCLLoss(weight_fn=3)
    for bad in (-1, (10, -1)):
        with pytest.raises(ValueError, match="Illegal memory bank size"):
            fl.NTXentLoss(memory_bank_size=bad)
    for bad in (2.5, True, (4, 2, 2), "64"):
        with pytest.raises(TypeError, match="memory_bank_size"):
            fl.NTXentLoss(memory_bank_size=bad)
    with pytest.warns(UserWarning, match="does not specify feature dimension"):
        fl.NTXentLoss(memory_bank_size=8)

    out0, out1 = views(4, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="out1 must match out0"):
        fl.NTXentLoss()(out0, out1[:3])
    with pytest.raises(ValueError, match="out0 must be a floating Tensor"):
        fl.NTXentLoss()(out0[0], out1)
    with pytest.raises(ValueError, match="out1 must be a floating Tensor"):
        fl.DCLLoss()(out0, out1.long())
    with pytest.raises(ValueError, match=r"memory bank holds 6-dim.*embedding_size 8"):
        fl.NTXentLoss(memory_bank_size=(10, 6))(out0, out1)
    with pytest.raises(ValueError, match=r"weight_fn must return a Tensor\[4\]"):
        fl.DCLLoss(weight_fn=lambda a, b: torch.ones(3))(out0, out1)
    bank_loss = fl.NTXentLoss(memory_bank_size=(10, 8))
    with pytest.raises(ValueError, match="bank must be a Tensor"):
        bank_loss.memory_bank.bank = torch.zeros(9, 8)
    with pytest.raises(ValueError, match="bank_ptr"):
        bank_loss.memory_bank.bank_ptr = 10

    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    for cls in (fl.NTXentLoss, fl.DCLLoss, fl.DCLWLoss):
        with pytest.raises(ValueError, match="gather_distributed"):
            cls(gather_distributed=True)
        cls(gather_distributed=False)


# --------------------------------------------------------------------- two ranks (gloo)

WORLD = 2
# name -> (constructor taking lightly.loss or fastiml.losses.lightly, steps)
DDP_CASES = {
    "ntxent": (lambda m: m.NTXentLoss(0.3, gather_distributed=True), 1),
    "ntxent_negative_t": (lambda m: m.NTXentLoss(-0.3, gather_distributed=True), 1),
    "dclw": (lambda m: m.DCLWLoss(0.2, gather_distributed=True), 1),
    # K = 20, 4 rows per rank: each update writes both ranks' 8 keys (0, 8, 16 -> wraps)
    "bank": (lambda m: m.NTXentLoss(0.3, memory_bank_size=(20, 8),
                                    gather_distributed=True).double(), 3),
}


def ddp_worker(rank, init_file, out_dir):
    import torch.distributed as dist
    import warnings
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        import lightly.loss as ll
        results = {}
        for name, (make, steps) in DDP_CASES.items():
            modules = []
            for m in (ll, fl):
                torch.manual_seed(7)  # the same initial bank on both ranks and both modules
                modules.append(make(m))
            rows = []
            for step in range(steps):
                out0, out1 = views(4, 8, seed=100 * step + rank)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # lightly's DCL-W torch.tensor(tensor)
                    rows.append([value_and_grads(loss, out0, out1) for loss in modules])
            results[name] = (rows, [loss.memory_bank.bank.clone() if name == "bank" else None
                                    for loss in modules])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_lightly(tmp_path, ll):
    """gather_distributed under torch.distributed (2 gloo processes): each rank's loss and
    gradients equal lightly's on that rank (columns gathered from both ranks with gradients,
    the bank fed with both ranks' keys), float64."""
    import torch.multiprocessing as mp
    mp.spawn(ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD,
             join=True)
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for name, (rows, banks) in results.items():
            for step, (theirs, ours) in enumerate(rows):
                assert_same(ours, theirs, name=f"rank {rank} {name} step {step}")
            if name == "bank":
                assert torch.equal(banks[1], banks[0]), f"rank {rank}: bank differs"
        alone = value_and_grads(fl.NTXentLoss(0.3), *views(4, 8, seed=rank))
        assert abs(results["ntxent"][0][0][1][0].item() - alone[0].item()) > 1e-3  # it gathers


# ------------------------------------------------------------- lightly's own test files

CONFTEST = '''
"""fastiml's classes in place of lightly's, before the test files import them."""
import contextlib
import json
import math
import os

import lightly.loss
import lightly.loss.dcl_loss
import lightly.loss.ntx_ent_loss
from fastiml.losses import lightly as fastiml_lightly

NAMES = ("NTXentLoss", "DCLLoss", "DCLWLoss", "negative_mises_fisher_weights")
for module in (lightly.loss, lightly.loss.dcl_loss, lightly.loss.ntx_ent_loss):
    for name in NAMES:
        if hasattr(module, name):
            setattr(module, name, getattr(fastiml_lightly, name))


def pytest_collection_finish(session):
    """Which module each test file's names come from."""
    seen = {}
    for item in session.items:
        module = item.module
        seen[module.__name__] = {n: getattr(module, n).__module__ for n in NAMES
                                 if hasattr(module, n)}
    with open(os.environ["FASTIML_STAND_IN_REPORT"], "w") as f:
        json.dump(seen, f)
'''

LIGHTLY_TESTS = ("test_ntx_ent_loss.py", "test_dcl_loss.py")


def test_lightly_own_tests_pass_with_fastiml(tmp_path, ll):
    """lightly's tests/loss/test_ntx_ent_loss.py and test_dcl_loss.py (float32, CPU), in a
    pytest subprocess whose conftest puts fastiml's NTXentLoss, DCLLoss, DCLWLoss and
    negative_mises_fisher_weights in lightly's modules before the files import them."""
    repo = os.environ.get("FASTIML_LIGHTLY_REPO")
    if not repo or not all(os.path.isfile(os.path.join(repo, "tests", "loss", name))
                           for name in LIGHTLY_TESTS):
        pytest.skip("set FASTIML_LIGHTLY_REPO to a lightly checkout (v1.5.26) to run its tests")
    pytest.importorskip("pytest_mock")  # lightly's tests use the mocker fixture
    suite = tmp_path / "lightly_tests"
    suite.mkdir()
    for name in LIGHTLY_TESTS:
        shutil.copy(os.path.join(repo, "tests", "loss", name), suite / name)
    (suite / "conftest.py").write_text(CONFTEST)
    report = tmp_path / "stand_ins.json"
    env = dict(os.environ, LIGHTLY_DID_VERSION_CHECK="True",
               FASTIML_STAND_IN_REPORT=str(report),
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                          if p))
    proc = subprocess.run([sys.executable, "-m", "pytest", str(suite), "-q",
                           "-p", "no:cacheprovider", "--rootdir", str(suite)],
                          cwd=suite, env=env, capture_output=True, text=True, timeout=900)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
    stand_ins = json.loads(report.read_text())
    assert set(stand_ins) == {"test_ntx_ent_loss", "test_dcl_loss"}, stand_ins
    for module, names in stand_ins.items():
        assert names and set(names.values()) == {"fastiml.losses.lightly"}, (module, names)


# --------------------------------------------------------------------------- benchmark

def test_bench_lightly_case_and_guard(tmp_path, ll):
    """The benchmark's two providers compute the same MoCo loss; the memory guard skips
    lightly's B x K logits where they do not fit."""
    from benchmarks import bench_lightly, harness
    case = {"b": 16, "k": 256, "d": 8, "repeat": 1, "threads": 1}
    ours = bench_lightly.run_case({**case, "provider": "fastiml"})
    theirs = bench_lightly.run_case({**case, "provider": "lightly"})
    assert ours["loss"] > 0 and ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    assert harness.memory_guard(bench_lightly.estimate_bytes("fastiml", 65536, 65536), 8) is None
    assert harness.memory_guard(bench_lightly.estimate_bytes("lightly", 65536, 65536),
                                8).startswith("skipped (needs ~")
    argv = ["--sizes", "16", "--bank", "256", "--repeat", "1", "--threads", "1", "--paired",
            "2", "--in-process", "--no-csv", "--json", str(tmp_path / "r.json")]
    assert bench_lightly.main(argv) == 0
    payload = json.loads((tmp_path / "r.json").read_text())
    by_provider = {r["provider"]: r for r in payload["results"]}
    assert set(by_provider) == {"fastiml", "lightly", "paired"}
    assert all(r["status"] == "ok" for r in by_provider.values())
    assert by_provider["fastiml"]["metrics"]["loss_rel_diff_vs_lightly"] < 1e-5
    paired = by_provider["paired"]["metrics"]
    assert paired["paired_speedup"] > 0 and paired["lightly_time_s"] > 0
    assert "| B | K | fastiml s | lightly s |" in payload["table_markdown"]
