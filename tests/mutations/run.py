"""Mutation check: seeds one known bug at a time into a copy of the package and reports which
tests catch it.

    .venv/bin/python tests/mutations/run.py [--only NAME[,NAME...]] [--list] [--no-baseline]

The repository's ``fastiml/`` (the compiled ``fastiml/_C*.so`` included: mutations touch
Python only, nothing is rebuilt), ``tests/`` and ``benchmarks/`` are copied into a temporary
directory. Each mutation replaces one exact text of one source file of the copy; a text that
is no longer there (or is there twice) stops the script before anything runs, so a mutation
cannot rot into a no-op. The mutation's tests then run in a child process against the copy
(``PYTHONPATH`` = the copy, ``pytest -p no:cacheprovider -x -q``), which checks after the run
that the ``fastiml`` it imported is the copy's; the file is restored before the next mutation.
First each distinct test selection runs unmutated (the baseline): a selection that fails
without a bug cannot show that it catches one.

Prints one row per mutation: its name, the tests run, how many ran, whether they caught it
and the first failing test. Exits 1 when a mutation is not caught or a baseline fails.
Pytest does not collect this file (no ``test_`` prefix).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parents[2]
COPIED = ("fastiml", "tests", "benchmarks")


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    old: str  # exact text, present once
    new: str
    tests: Tuple[str, ...]  # pytest arguments: files, node ids, -k expressions
    why: str


# -------------------------------------------------------------------------------- mutations

_HALF = "(torch.float16, torch.bfloat16)"
_PAIR_STATS_BACKWARD_CALL = """\
    grad_q, grad_k = torch.ops.fastiml.pair_stats_backward(
        grad_lse, grad_pos_mean, q, k, q_label, k_label, q_group, k_group, lse, pos_count,
        *ctx.args, q_needs, k is not None and k_needs)
"""
_SMALLEST = """\
small = torch.zeros(g.numel(), dtype=torch.bool, device=g.device)
small[g.abs().flatten().argsort()[:int({fraction} * g.numel())]] = True
small = small.view_as(g)
"""


def _pair_stats_half(body: str) -> str:
    """pair_stats' backward call, then ``body`` (a function of one gradient ``g``) applied to
    both gradients when the inputs are half precision."""
    return (_PAIR_STATS_BACKWARD_CALL
            + f"    if grad_q.dtype in {_HALF}:\n"
            + "        def _perturb(g):\n" + textwrap.indent(body, " " * 12)
            + "        grad_q, grad_k = _perturb(grad_q), _perturb(grad_k)\n")


_HALF_GRAD_TESTS = ("tests/test_pair_stats.py", "tests/test_clip.py", "tests/test_ntxent.py",
                    "-k", "half")

MUTATIONS = [
    Mutation(
        "autocast_off", "fastiml/engine/precision.py",
        "    return torch.autocast(device_type=device.type, dtype=dtype)",
        "    return contextlib.nullcontext()",
        ("tests/test_reliability.py", "-k", "mixed_precision"),
        "AMP training runs in float32 while claiming bf16/fp16"),
    Mutation(
        "half_grads_plus_5pct", "fastiml/ops.py", _PAIR_STATS_BACKWARD_CALL,
        _pair_stats_half("return g * 1.05\n"),
        _HALF_GRAD_TESTS, "pair_stats' half-precision gradients 5 % too large"),
    Mutation(
        "half_grads_smallest_44pct_zeroed", "fastiml/ops.py", _PAIR_STATS_BACKWARD_CALL,
        _pair_stats_half(_SMALLEST.format(fraction=0.44)
                         + "return torch.where(small, torch.zeros_like(g), g)\n"),
        _HALF_GRAD_TESTS, "the smallest 44 % of pair_stats' half gradients flushed to 0"),
    Mutation(
        "half_grads_smallest_33pct_sign_flipped", "fastiml/ops.py", _PAIR_STATS_BACKWARD_CALL,
        _pair_stats_half(_SMALLEST.format(fraction=0.33)
                         + "return torch.where(small, -g, g)\n"),
        _HALF_GRAD_TESTS, "the smallest 33 % of pair_stats' half gradients with the wrong sign"),
    Mutation(
        "pivot_half_grads_plus_5pct", "fastiml/ops.py",
        "    return grad_a, grad_b, None, None, None, None\n",
        "    if grad_a.dtype in " + _HALF + ":\n"
        "        grad_a, grad_b = grad_a * 1.05, grad_b * 1.05\n"
        "    return grad_a, grad_b, None, None, None, None\n",
        ("tests/test_pivot.py", "-k", "half"), "pivot_consistency's half gradients 5 % too large"),
    Mutation(
        "pivot_grads_swapped", "fastiml/ops.py",
        "    return grad_a, grad_b, None, None, None, None\n",
        "    return grad_b, grad_a, None, None, None, None\n",
        ("tests/test_pivot.py",),
        "pivot_consistency's two gradients returned in each other's place"),
    Mutation(
        "pair_softplus_lse_grad_unweighted", "fastiml/ops.py",
        "        grad_lse = grad_total * weight\n",
        "        grad_lse = grad_total\n",
        ("tests/test_pair_softplus.py",), "d total / d lse taken as 1 instead of the sigmoid sum"),
    Mutation(
        "pair_stats_ignore_index_not_passed", "fastiml/ops.py",
        '        denominator == "negatives", int(ignore_index))',
        '        denominator == "negatives", -1)',
        ("tests/test_pair_stats.py", "-k", "ignore"),
        "pair_stats always ignores label -1, whatever ignore_index says"),
    Mutation(
        "pair_stats_denominator_always_all", "fastiml/ops.py",
        '        denominator == "negatives", int(ignore_index))',
        '        False, int(ignore_index))',
        ("tests/test_pair_stats.py", "-k", "negatives"),
        'denominator="negatives" silently computes the "all" log-sum-exp'),
    Mutation(
        "mpc_cross_scale_y_with_y", "fastiml/losses/mpc.py",
        '("x_a", "y_a"), ("y_a", "x_a"), ("x_a", "x_b")',
        '("x_a", "y_a"), ("y_a", "y_a"), ("x_a", "x_b")',
        ("tests/test_mpc_loss.py",), "MPC's cross-scale term contrasts Y with Y (TERM_SETS)"),
    Mutation(
        "clip_logit_scale_detached", "fastiml/losses/clip.py",
        "    rows = query * scale\n",
        "    rows = query * (scale.detach() if isinstance(scale, Tensor) else scale)\n",
        ("tests/test_clip.py",), "ClipLoss drops the gradient of the learned logit_scale"),
]


# ------------------------------------------------------------------------------ the copy

def make_copy(destination: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "mutations")
    for name in COPIED:
        shutil.copytree(ROOT / name, destination / name, ignore=ignore)
    if not list((destination / "fastiml").glob("_C*.so")):
        sys.exit(f"no compiled fastiml/_C*.so under {ROOT / 'fastiml'}: build the package "
                 f"first (.ci/setup)")


def check_texts(mutations: List[Mutation]) -> None:
    """Every mutation's old text is present exactly once in the repository's file."""
    problems = []
    for m in mutations:
        path = ROOT / m.file
        count = path.read_text().count(m.old) if path.exists() else -1
        if count != 1:
            where = "file missing" if count < 0 else f"found {count} times, expected once"
            problems.append(f"  {m.name}: text to replace in {m.file}: {where}:\n"
                            f"{textwrap.indent(m.old.rstrip(), '      | ')}")
    if problems:
        sys.exit("mutation texts out of date (update them to the code they mean to break):\n"
                 + "\n".join(problems))


# The child: pytest against the copy, then a check that the fastiml it imported is the copy's.
_CHILD = """\
import sys
from pathlib import Path
import pytest
copy = Path(sys.argv[1]).resolve()
rc = int(pytest.main(sys.argv[2:]))
module = sys.modules.get("fastiml")
if module is not None and copy not in Path(module.__file__).resolve().parents:
    print(f"MUTATION-CHECK: the tests imported {module.__file__}, not the copy under {copy}")
    rc = 97
sys.exit(rc)
"""


@dataclass
class Outcome:
    rc: int
    ran: int
    first_failure: str
    seconds: float
    tail: str


def run_tests(copy: Path, tests: Tuple[str, ...]) -> Outcome:
    # No bytecode: a restored file must not meet the cached bytecode of its mutated self.
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(copy), "-p", "no:cacheprovider",
                           "-x", "-q", *tests], cwd=copy, env=env, capture_output=True,
                          text=True)
    out = proc.stdout + proc.stderr
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?)", out)}
    failures = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.M)
    return Outcome(proc.returncode, sum(counts.values()), failures[0] if failures else "",
                   time.time() - start, "\n".join(out.strip().splitlines()[-15:]))


def verdict(outcome: Outcome) -> str:
    return {0: "NO", 1: "yes", 5: "ERROR: no test selected",
            97: "ERROR: imported the repository's fastiml"}.get(
        outcome.rc, f"ERROR: pytest exit code {outcome.rc}")


# ---------------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[],
                        help="mutation name(s) to run (repeat or comma-separate); default all")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the unmutated run of each test selection")
    args = parser.parse_args()
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:42s} {m.file:28s} {m.why}")
        return 0
    wanted = {n for item in args.only for n in item.split(",") if n}
    unknown = wanted - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"--only: unknown mutation(s) {sorted(unknown)}; --list shows them")
    mutations = [m for m in MUTATIONS if not wanted or m.name in wanted]
    check_texts(mutations)

    failed = False
    with tempfile.TemporaryDirectory(prefix="fastiml-mutations-") as tmp:
        copy = Path(tmp)
        make_copy(copy)
        print(f"copy of {ROOT} in {copy}")
        if not args.no_baseline:
            for tests in dict.fromkeys(m.tests for m in mutations):
                base = run_tests(copy, tests)
                print(f"baseline  {' '.join(tests)}: {base.ran} ran, exit {base.rc} "
                      f"({base.seconds:.0f} s)")
                if base.rc != 0:
                    failed = True
                    print(f"  the selection fails without a mutation:\n"
                          f"{textwrap.indent(base.tail, '  | ')}")
        rows = []
        for m in mutations:
            path = copy / m.file
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new, 1))
            try:
                outcome = run_tests(copy, m.tests)
            finally:
                path.write_text(original)
            rows.append((m, outcome))
            print(f"  {m.name}: {verdict(outcome)} ({outcome.seconds:.0f} s)", flush=True)
            if outcome.rc not in (0, 1):
                print(textwrap.indent(outcome.tail, "  | "))
            failed |= outcome.rc != 1

    header = ("mutation", "tests run", "ran", "caught", "first failing test")
    table = [header] + [(m.name, " ".join(m.tests), str(o.ran), verdict(o),
                         o.first_failure or "-") for m, o in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    print()
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
