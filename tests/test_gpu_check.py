"""benchmarks/gpu_check.sh, the one-shot GPU check: without a GPU it runs the CPU selftest and
skips the GPU parts with the reason (exit 0); a failing selftest row, a part that hangs, or a
budget spent make it say so and, for the first two, exit non-zero.

The GPU is hidden from every run (CUDA_VISIBLE_DEVICES=""), so these tests check the no-GPU
path on any machine; --no-build keeps them from ever running .ci/setup.
"""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
NO_GPU = "no GPU: torch.cuda.is_available() is False (CUDA_VISIBLE_DEVICES='')"
GPU_PARTS = [name for name, _, _ in gpu_check.TIMING_PARTS]


def _run(out: Path, env_extra=None, *args):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", FASTIML_PYTHON=sys.executable,
               **(env_extra or {}))
    proc = subprocess.run(["bash", str(SCRIPT), str(out), "--no-build", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=240)
    results = json.loads((out / "results.json").read_text())
    return proc, results, (out / "summary.md").read_text()


def _parts(results):
    return {p["name"]: p for p in results["parts"]}


def _fake_selftest(tmp_path: Path, body: str) -> dict:
    """A module standing in for fastiml.selftest (FASTIML_GPU_CHECK_SELFTEST): its run()
    returns rows made by *_case functions, like the real one."""
    (tmp_path / "fake_selftest.py").write_text(textwrap.dedent('''
        import time

        def _row(op, status, reason=""):
            return dict(op=op, device="cpu", dtype="float32", shape="N=8", output="lse",
                        error=0.5 if status == "FAIL" else 1e-7, tolerance=1e-6,
                        status=status, reason=reason, checks=[], seconds=0.0)

        def good_case():
            return _row("pair_stats/general", "PASS")
    ''') + textwrap.dedent(body))
    return {"FASTIML_GPU_CHECK_SELFTEST": "fake_selftest",
            "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}


def test_no_gpu_runs_the_cpu_selftest_and_skips_the_gpu_parts(tmp_path):
    proc, results, summary = _run(tmp_path / "out")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    parts = _parts(results)
    assert parts["build"]["status"] == "SKIP" and "not needed" in parts["build"]["reason"]
    assert parts["probe"]["status"] == "PASS"
    assert results["machine"]["cuda_available"] is False
    # The CPU part: the real selftest, every row on the CPU, all passed.
    selftest = parts["selftest"]
    assert selftest["status"] == "PASS" and "--device cpu --quick" in selftest["what"]
    rows = results["selftest_rows"]
    assert {r["device"] for r in rows} == {"cpu"}
    assert {r["op"] for r in rows} >= {"pair_stats/general", "pair_stats/self",
                                        "pair_softplus/general", "pivot_consistency"}
    assert all(r["status"] in ("PASS", "INFO") for r in rows), [
        (r["op"], r["status"], r["reason"]) for r in rows if r["status"] not in ("PASS", "INFO")]
    assert selftest["rows"]["PASS"] == sum(r["status"] == "PASS" for r in rows) > 20
    assert 0 < selftest["seconds"] <= selftest["timeout_s"]
    # The GPU parts: skipped, each with the no-GPU reason, in the JSON and in the table.
    for name in GPU_PARTS:
        assert parts[name]["status"] == "SKIP" and parts[name]["reason"] == NO_GPU
        assert any(line.startswith(f"| {name} |") and "| SKIP |" in line and NO_GPU in line
                   for line in summary.splitlines()), name
    assert results["timings"] == [] and results["exit_status"] == 0
    assert summary.startswith("# fastiml GPU check\n\n**PASS**")
    assert "| selftest |" in summary and "max error" in (tmp_path / "out" / "logs" /
                                                          "selftest.log").read_text()
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # printed too


def test_a_failing_selftest_row_fails_the_check(tmp_path):
    env = _fake_selftest(tmp_path, '''
        def bad_case():
            return _row("pair_stats/self", "FAIL", "failed: grad_q")

        def run(devices=None, verbose=True, full=False, quick=False):
            return [good_case(), bad_case()]
    ''')
    proc, results, summary = _run(tmp_path / "out", env)
    assert proc.returncode == 1, proc.stdout[-3000:]
    selftest = _parts(results)["selftest"]
    assert selftest["status"] == "FAIL"
    assert selftest["reason"].startswith("1 rows failed: pair_stats/self cpu float32")
    assert results["exit_status"] == 1 and summary.startswith("# fastiml GPU check\n\n**FAIL** "
                                                              "(selftest)")
    # The failed row is listed in the table with its reason; the passing one is not.
    assert "| pair_stats/self | cpu | float32 | N=8 | 0.5 | 1e-06 | FAIL: failed: grad_q |" \
        in summary
    assert "| pair_stats/general |" not in summary


def test_a_hanging_selftest_is_cut_at_its_timeout_with_the_rows_made_before(tmp_path,
                                                                            monkeypatch):
    env = _fake_selftest(tmp_path, '''
        def hang_case():
            time.sleep(600)

        def run(devices=None, verbose=True, full=False, quick=False):
            return [good_case(), hang_case()]
    ''')
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(gpu_check, "SELFTEST_MIN_S", 1.0)
    check = gpu_check.Check(tmp_path / "out", sys.executable, budget=8.0, build_timeout=1.0,
                            no_build=True)
    check.budget_t0 = time.monotonic()
    start = time.monotonic()
    check.selftest(gpu=False, reserve=2.0)
    assert time.monotonic() - start < 20
    part = check.parts[-1]
    # 8 s of budget, 2 kept for later parts, 3 for the kill: a 3 s timeout
    assert part["status"] == "FAIL" and "timed out after 3 s" in part["reason"]
    assert [r["op"] for r in check.selftest_rows] == ["pair_stats/general"]  # streamed
    log = (tmp_path / "out" / "logs" / "selftest.log").read_text()
    assert "hang_case" in log  # the stack dumped before the kill names the hung check
    # Spent budget: the next part is not started, and says why.
    check.budget_t0 -= check.budget
    timeout, reason = check.timeout_for(60.0, 20.0, 0.0)
    assert timeout is None and reason.startswith("budget: 0 s of 8 s left")


def test_the_budget_keeps_the_later_parts_minimums(tmp_path):
    check = gpu_check.Check(tmp_path, sys.executable, budget=100.0, build_timeout=1.0,
                            no_build=True)
    check.budget_t0 = time.monotonic()
    timeout, reason = check.timeout_for(cap=1000.0, minimum=10.0, reserve=60.0)
    assert reason is None and 36.0 < timeout <= 37.0  # 100 s left: 60 for later, 3 to kill
    timeout, reason = check.timeout_for(cap=30.0, minimum=10.0, reserve=60.0)
    assert timeout == 30.0
    timeout, reason = check.timeout_for(cap=30.0, minimum=45.0, reserve=60.0)
    assert timeout is None and "60 s kept for later parts" in reason
    # By design: the default budget covers the timing parts' minimums and the selftest's.
    assert sum(m for _, _, m in gpu_check.TIMING_PARTS) + gpu_check.SELFTEST_MIN_S \
        + gpu_check.PROBE_CAP_S <= gpu_check.DEFAULT_BUDGET_S


def test_a_timeout_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    start = time.monotonic()
    r = gpu_check.run_logged(["bash", "-c", f"sleep 300 & echo $! > {pid_file}; wait"],
                             tmp_path / "x.log", timeout=1.0)
    assert r["timed_out"] and r["rc"] is None and time.monotonic() - start < 15
    pid = int(pid_file.read_text())
    for _ in range(50):  # the grandchild, killed with its group, is reaped by init
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        pytest.fail("the grandchild outlived the timeout")
    assert "timed out after" in (tmp_path / "x.log").read_text()


def _probe(**kw):
    return dict(dict(ops="ok", cuda_available=True, compiled_with_cuda=True, gpu="test GPU",
                     gpu_memory_gb=4.0, pair_bound_s=None, mpc_ratio_target=4.5), **kw)


def _run_one_part(tmp_path, monkeypatch, name, probe, **sizes):
    """Runs timing part `name` alone through the driver, its benchmark on the CPU with the
    module's size constants set to `sizes` (the same command line, harness and JSON fields
    as on CUDA); returns the Check and the part."""
    monkeypatch.setattr(gpu_check, "BENCH_DEVICE", "cpu")
    for constant, value in sizes.items():
        monkeypatch.setattr(gpu_check, constant, value)
    monkeypatch.setattr(gpu_check, "TIMING_PARTS", ((name, 120.0, 5.0),))
    check = gpu_check.Check(tmp_path, sys.executable, budget=200.0, build_timeout=1.0,
                            no_build=True)
    check.probe = probe
    check.timing_parts(None)
    part, = check.parts
    return check, part


def test_the_pair_stats_part_reads_the_benchmark_and_applies_twice_the_bound(tmp_path,
                                                                              monkeypatch):
    """The real bench_pair_stats command line and JSON (on the CPU at N = 256), judged
    against 2x the bound."""
    check, part = _run_one_part(tmp_path, monkeypatch, "pair_stats", _probe(pair_bound_s=10.0),
                                PAIR_N=256, PAIR_REPEAT=2)
    assert part["status"] == "PASS", part
    assert "--sizes 256 --dtypes bfloat16 --providers fused" in part["command"]
    timing, = check.timings
    measured = timing["value"]
    assert 0 < measured < 10 and timing["status"] == "PASS" and timing["target"] == 20.0
    assert "fused / 4·mm" in timing["note"] and "GEMM rate" in timing["note"]  # its rooflines
    results = check.bench_json["pair_stats"]["results"]
    # Between the bound and twice the bound: a pass; above twice: a failure, said as such.
    check.probe = _probe(pair_bound_s=measured / 1.5)
    assert check.pair_timing(results)["status"] == "PASS"
    check.probe = _probe(pair_bound_s=measured / 2.5)
    over = check.pair_timing(results)
    assert over["status"] == "FAIL" and over["note"].startswith("2.50 × the README's bound")
    failing = dict(part, status="PASS", reason="")
    check.finish_bench(failing, [over])
    assert failing["status"] == "FAIL" and "above its target" in failing["reason"]
    assert check.failed() == [failing]


def test_the_mpc_batch_ratio_against_its_target(tmp_path):
    check = gpu_check.Check(tmp_path, sys.executable, budget=10.0, build_timeout=1.0,
                            no_build=True)
    check.probe = _probe()
    ok, over, missing = (check.mpc_ratio(f) for f in ({4: 0.5, 16: 2.1}, {4: 0.5, 16: 2.5},
                                                       {4: None, 16: 2.5}))
    assert (ok["shown"], ok["status"]) == ("4.20", "PASS")
    assert (over["shown"], over["status"]) == ("5.00", "FAIL")
    # A batch not measured is its own part's failure (or skip), not the ratio's.
    assert missing["value"] is None and missing["status"] == "INFO"


def test_the_clip_and_siglip_parts_are_listed_and_skipped_with_the_reason(tmp_path):
    assert GPU_PARTS == ["pair_stats", "mpc_b4", "mpc_b16", "clip", "siglip", "ntxent"]
    check = gpu_check.Check(tmp_path, sys.executable, budget=480.0, build_timeout=1.0,
                            no_build=True)
    check.timing_parts(NO_GPU)
    parts = _parts({"parts": check.parts})
    assert [p["name"] for p in check.parts] == GPU_PARTS
    for name, loss in (("clip", "ClipLoss"), ("siglip", "SigLipLoss")):
        assert parts[name]["status"] == "SKIP" and parts[name]["reason"] == NO_GPU
        assert parts[name]["what"].startswith(f"{loss} fwd+bwd B=65536 D=512 bfloat16")
    assert check.timings == [] and not check.failed()
    assert "| siglip | SigLipLoss fwd+bwd B=65536 D=512 bfloat16" in check.summary()


def _result(provider, status="ok", time_s=None, mib=None, loss=1.0):
    metrics = {} if status != "ok" else {"time_s": time_s, "peak_above_inputs_mb": mib,
                                         "loss": loss}
    return dict(provider=provider, params={"B": 65536, "dtype": "bfloat16"}, status=status,
                metrics=metrics)


def _part(name):
    return dict(name=name, what="", status="PASS", reason="", seconds=1.0, timeout_s=45.0,
                command="", log="")


def test_the_clip_verdicts_memory_against_736_mb_and_time_against_open_clip(tmp_path):
    check = gpu_check.Check(tmp_path, sys.executable, budget=10.0, build_timeout=1.0,
                            no_build=True)

    def verdict(ours, base):
        speed, *memory = check.clip_timings("ClipLoss B=65536", [ours, base])
        return speed, (memory[0] if memory else None)

    fast_small = _result("fastiml", time_s=0.1, mib=500.0)
    speed, memory = verdict(fast_small, _result("open_clip", time_s=0.25, mib=40000.0))
    assert (speed["status"], speed["target"], speed["shown"]) == ("PASS", 0.25, "0.100 s")
    assert speed["note"].startswith("2.50 × open_clip's speed")
    assert (memory["status"], memory["shown"]) == ("PASS", "524 MB")  # 500 MiB
    assert "open_clip 41943 MB (80 × more)" in memory["note"]
    # Slower than open_clip: FAIL, and the part fails saying why.
    speed, memory = verdict(fast_small, _result("open_clip", time_s=0.05, mib=40000.0))
    assert speed["status"] == "FAIL" and memory["status"] == "PASS"
    part = _part("clip")
    check.finish_bench(part, [speed, memory])
    assert part["status"] == "FAIL" and part["reason"] == (
        "ClipLoss B=65536: 0.100 s above its target < 0.050 s (open_clip)")
    # The memory target is 736e6 bytes: 700 MiB (734 MB) passes, 705 MiB (739 MB) fails.
    for mib, status in ((700.0, "PASS"), (705.0, "FAIL"), (800.0, "FAIL")):
        _, memory = verdict(_result("fastiml", time_s=0.1, mib=mib),
                            _result("open_clip", time_s=0.2, mib=4e4))
        assert memory["status"] == status, (mib, memory)
    part = _part("siglip")
    check.finish_bench(part, list(verdict(_result("fastiml", time_s=0.1, mib=800.0),
                                          _result("open_clip", time_s=0.2, mib=4e4))))
    assert part["status"] == "FAIL" and part["reason"] == (
        "ClipLoss B=65536 peak memory: 839 MB above its target ≤ 736 MB (siglip-kernel)")
    # open_clip skipped for memory: the speed is INFO with its estimate; memory still judged.
    speed, memory = verdict(fast_small, _result("open_clip", "skipped (needs ~52 GB)"))
    assert speed["status"] == "INFO" and "open_clip: skipped (needs ~52 GB)" in speed["note"]
    assert memory["status"] == "PASS" and "open_clip" not in memory["note"]
    # fastiml itself failed: one FAIL row, and the part fails as not measured.
    rows = check.clip_timings("ClipLoss B=65536", [
        _result("fastiml", "failed (RuntimeError: boom)"), _result("open_clip", time_s=0.2,
                                                                   mib=4e4)])
    assert [r["status"] for r in rows] == ["FAIL"] and rows[0]["note"].startswith("failed (")
    part = _part("clip")
    check.finish_bench(part, rows)
    assert part["status"] == "FAIL" and part["reason"].startswith("not measured: ClipLoss")


def test_the_siglip_part_runs_bench_siglip_in_bf16_and_judges_it(tmp_path, monkeypatch):
    """The real bench_siglip command line and JSON (on the CPU at B = 32): bf16 features,
    open_clip's share of the GPU, both timing rows."""
    check, part = _run_one_part(tmp_path, monkeypatch, "siglip", _probe(gpu_memory_gb=10.0),
                                CONTRAST_B=32, CONTRAST_REPEAT=1)
    assert "benchmarks.bench_siglip" in part["command"]
    assert "--sizes 32 --repeat 1 --dtypes bfloat16" in part["command"]
    assert "--max-gb 9 " in part["command"]  # 90 % of the GPU for open_clip (half: 5)
    results = check.bench_json["siglip"]["results"]
    assert results and {r["params"]["dtype"] for r in results} == {"bfloat16"}
    ours = next(r for r in results if r["provider"] == "fastiml")
    assert ours["status"] == "ok" and ours["metrics"]["loss"] > 0
    speed, memory = check.timings
    assert speed["name"] == "SigLipLoss B=32" and speed["shape"] == "D=512 bfloat16"
    assert speed["value"] == ours["metrics"]["time_s"]
    assert memory["value"] == pytest.approx(ours["metrics"]["peak_above_inputs_mb"] * 1.048576)
    assert memory["status"] == "PASS"  # a few MB at B = 32
    base = next((r for r in results if r["provider"] == "open_clip"), None)
    if base is not None and base["status"] == "ok":
        assert speed["status"] == ("PASS" if speed["value"] < base["metrics"]["time_s"]
                                   else "FAIL")
        assert part["status"] == ("PASS" if speed["status"] == "PASS" else "FAIL")
    else:
        assert speed["status"] == "INFO" and part["status"] == "PASS"


def test_a_part_cut_at_its_timeout_leaves_the_next_its_minimum(tmp_path, monkeypatch):
    """The reserve counts each later part's minimum and the grace its own kill may take: a
    selftest that hangs to its timeout still leaves the first timing part its minimum."""
    env = _fake_selftest(tmp_path, '''
        def run(devices=None, verbose=True, full=False, quick=False):
            time.sleep(600)
    ''')
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(gpu_check, "SELFTEST_MIN_S", 1.0)
    parts = (("pair_stats", 60.0, 2.0),)
    check = gpu_check.Check(tmp_path / "out", sys.executable, budget=10.0, build_timeout=1.0,
                            no_build=True)
    check.budget_t0 = time.monotonic()
    check.selftest(gpu=False, reserve=gpu_check.reserve_s(parts))
    assert "timed out" in check.parts[-1]["reason"]
    timeout, reason = check.timeout_for(*parts[0][1:], gpu_check.reserve_s(()))
    assert reason is None and timeout >= 2.0
