"""Smoke tests of the benchmark scripts (benchmarks/): every case function runs on tiny inputs
in this process and returns the fields the tables and the CSV need. No timing assertions."""
import csv
import importlib.util
import json
import math

import pytest
import torch

from benchmarks import (bench_clip, bench_contour, bench_ntxent, bench_pair_stats, bench_pivot,
                        harness, plot)

HAS_PML = importlib.util.find_spec("pytorch_metric_learning") is not None
HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _check_case(out: dict) -> None:
    for key in ("time_s", "times", "repeat", "inputs_mb", "peak_mb", "peak_above_inputs_mb"):
        assert key in out, f"missing {key} in {sorted(out)}"
    assert out["time_s"] > 0 and all(t > 0 for t in out["times"])
    assert out["peak_above_inputs_mb"] >= 0 and out["peak_mb"] > 0


@pytest.mark.parametrize("provider", [
    "fused", "naive", "supcontrast",
    pytest.param("pml", marks=pytest.mark.skipif(not HAS_PML,
                                                 reason="pytorch-metric-learning not installed"))])
def test_pair_stats_case(provider):
    out = bench_pair_stats.run_case({"provider": provider, "n": 256, "dtype": "float32",
                                     "repeat": 1, "threads": 1,
                                     "time_mm": "float32" if provider == "fused" else None,
                                     "gemm_rate": "float32" if provider == "fused" else None})
    _check_case(out)
    # Every provider computes the same SupCon loss on the same inputs.
    fused = bench_pair_stats.run_case({"provider": "fused", "n": 256, "repeat": 1,
                                       "threads": 1})
    assert out["loss"] == pytest.approx(fused["loss"], rel=1e-4)
    if provider == "fused":
        assert out["mm_s"] > 0 and out["gemm_gflops"] > 0


def test_pair_stats_general_mode_case():
    """General mode (q, k distinct): fused and naive compute the same loss; others refuse."""
    case = {"n": 192, "dtype": "float32", "repeat": 1, "threads": 1, "mode": "general"}
    fused = bench_pair_stats.run_case({**case, "provider": "fused"})
    naive = bench_pair_stats.run_case({**case, "provider": "naive"})
    _check_case(fused)
    assert fused["loss"] == pytest.approx(naive["loss"], rel=1e-4)
    self_mode = bench_pair_stats.run_case({**case, "provider": "fused", "mode": "self"})
    assert self_mode["loss"] != pytest.approx(fused["loss"], rel=1e-3)
    with pytest.raises(ValueError, match="general mode"):
        bench_pair_stats.run_case({**case, "provider": "supcontrast"})


def test_pair_stats_bf16_case():
    _check_case(bench_pair_stats.run_case({"provider": "fused", "n": 128, "dtype": "bfloat16",
                                           "repeat": 1, "threads": 1}))


@pytest.mark.parametrize("op,param", [("contour_mine", 4), ("contour_band", 3)])
def test_contour_cases(op, param):
    sums = set()
    for provider in bench_contour.PROVIDERS:
        out = bench_contour.run_case({"op": op, "provider": provider, "param": param,
                                      "batch": 2, "size": 64, "repeat": 1, "threads": 1})
        _check_case(out)
        if provider != "clone":  # the bandwidth yardstick finds no cells
            sums.add(out["checksum"])
    assert len(sums) == 1 and sums.pop() > 0  # same cells / pixels, and some of them


def test_pivot_cases():
    losses = {}
    for provider in bench_pivot.PROVIDERS:
        out = bench_pivot.run_case({"provider": provider, "batch": 2, "size": 64, "patch": 16,
                                    "dtype": "float32", "repeat": 1, "threads": 1})
        _check_case(out)
        losses[provider] = out["loss"]
        if provider == "fused":  # both floors, timed in the fused case's own process
            assert out["floor_s"] > 0 and out["clone_floor_s"] > 0
            assert out["clone_floor_ratio"] > 0
    assert losses["fused"] > 0
    assert losses["fused"] == pytest.approx(losses["plain"], rel=1e-4)
    assert losses["fused"] == pytest.approx(losses["reference"], rel=1e-4)


def test_pair_stats_main_in_process(tmp_path):
    """The whole driver: guards, derived columns, CSV and JSON."""
    csv_path, json_path = tmp_path / "r.csv", tmp_path / "r.json"
    argv = ["--sizes", "128", "--dtypes", "float32", "--repeat", "1", "--threads", "1",
            "--providers", "fused", "naive", "supcontrast", "--in-process", "--modes", "self",
            "general",
            "--csv", str(csv_path), "--json", str(json_path)]
    assert bench_pair_stats.main(argv) == 0
    payload = json.loads(json_path.read_text())
    fused = [r for r in payload["results"] if r["provider"] == "fused"][0]
    for key in ("time_s", "mm_s", "roofline", "gemm_gflops", "gemm_roofline",
                "speedup_vs_naive", "speedup_vs_supcontrast", "peak_above_inputs_mb"):
        assert key in fused["metrics"], key
    general = [r for r in payload["results"]
               if r["provider"] == "fused" and r["params"]["mode"] == "general"][0]
    assert "gemm_roofline" in general["metrics"] and "speedup_vs_naive" in general["metrics"]
    assert "| N | mode | dtype | fused s |" in payload["table_markdown"]
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and set(rows[0]) == set(harness.CSV_COLUMNS)
    assert {r["provider"] for r in rows} == {"fused", "naive", "supcontrast"}
    assert all(r["commit"] and r["machine"] and r["torch"] for r in rows)


def test_memory_guard_skips(tmp_path):
    argv = ["--sizes", "65536", "--dtypes", "float32", "--providers", "naive", "--in-process",
            "--no-csv", "--json", str(tmp_path / "r.json")]
    assert bench_pair_stats.main(argv) == 0
    (result,) = json.loads((tmp_path / "r.json").read_text())["results"]
    assert result["status"].startswith("skipped (needs ~") and result["status"].endswith("GB)")


def test_guards_and_table():
    assert harness.memory_guard(20e9, 12) == "skipped (needs ~20 GB)"
    assert harness.memory_guard(1e9, 12) is None
    guard = harness.TimeGuard(max_s=10)
    assert guard.check(("naive", "float32"), 4096) is None
    guard.record(("naive", "float32"), 1024, 1.0)
    assert guard.check(("naive", "float32"), 2048) is None  # ~4 s
    assert guard.check(("naive", "float32"), 4096).startswith("skipped (est. ~16 s")
    t = harness.markdown_table(["a", "b"], [[1, 2]])
    assert t.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |"]


def test_time_fn_slow_first_run_is_the_measurement():
    out = harness.time_fn(lambda: None, repeat=3, slow_s=0.0)
    assert out["repeat"] == 1 and len(out["times"]) == 1
    out = harness.time_fn(lambda: sum(range(1000)), repeat=3)
    assert out["repeat"] == 3 and out["time_s"] > 0


def test_subprocess_case():
    """One case through the real child protocol (fresh interpreter, tagged JSON line)."""
    out = harness.run_in_subprocess(bench_pivot.MODULE,
                                    {"provider": "fused", "batch": 1, "size": 32, "patch": 16,
                                     "repeat": 1, "threads": 1}, timeout=120)
    assert out["status"] == "ok", out
    _check_case(out)


def test_child_reports_failure(capsys):
    assert harness.child_main(bench_pivot.run_case, json.dumps({"provider": "nope"})) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(harness.RESULT_TAG)
    assert json.loads(line[len(harness.RESULT_TAG):])["status"].startswith("failed (")


def test_plot_runs_or_explains(tmp_path):
    csv_path = tmp_path / "r.csv"
    info = harness.RunInfo("2025-01-01T00:00:00+00:00", "abc", "test machine", "2.x")
    harness.append_csv(csv_path, info, [
        harness.Result("pivot", "fused", {"B": 1, "H": 8, "W": 8, "patch": 4,
                                          "dtype": "float32"}, metrics={"time_s": 0.1,
                                                                        "peak_above_inputs_mb": 1}),
        harness.Result("pivot", "reference", {"B": 1, "H": 8, "W": 8, "patch": 4,
                                              "dtype": "float32"}, status="skipped (x)")])
    loaded = plot.load(csv_path)
    entries = loaded["pivot"]["2025-01-01T00:00:00+00:00"]
    assert {e["provider"]: e["status"] for e in entries} == {"fused": "ok",
                                                            "reference": "skipped (x)"}
    assert plot.main(["--csv", str(csv_path), "--out", str(tmp_path / "plots")]) == 0


def test_bench_accuracy_table():
    from benchmarks import bench_accuracy
    metrics = {"pixel_f1": 0.5, "pixel_auc": 0.8, "image_auc": 0.7,
               "by_kind": {"splice": {"n": 3, "pixel_f1": 0.6, "pixel_auc": 0.9},
                           "copymove": {"n": 2, "pixel_f1": 0.25, "pixel_auc": 0.6}}}
    s = bench_accuracy._summary(metrics)
    assert s["splice_f1"] == 0.6 and s["copymove_auc"] == 0.6 and "inpaint_f1" not in s
    row = {"method": "ncl", "variant": "trace", "seed": 0, "steps": 10, "synthetic": s,
           "photos": s, "independent": dict(s, image_auc=None)}
    lines = bench_accuracy.table([row], {"photos": 0.25}).splitlines()
    assert len(lines) == 7
    assert ("| ncl | trace | 0 | 10 | photos | 0.500 | 0.800 | 0.700 | 0.600 / 0.900 | "
            "0.250 / 0.600 | nan / nan |") in lines
    assert "| ncl | trace | 0 | 10 | independent | 0.500 | 0.800 | n/a |" in lines[4]
    assert lines[-1] == "all tampered (pixel F1 floor): photos 0.250"


def test_all_tampered_floor(tmp_path):
    """2m / (m + 1) per tampered image, authentic images left out."""
    import cv2
    import numpy as np

    from benchmarks import bench_accuracy
    quarter = np.zeros((4, 4), np.uint8)
    quarter[:2, :2] = 255
    half = np.zeros((4, 4), np.uint8)
    half[:2] = 255
    cv2.imwrite(str(tmp_path / "q.png"), quarter)
    cv2.imwrite(str(tmp_path / "h.png"), half)
    (tmp_path / "list.json").write_text('[["a.png", "q.png"], ["b.png", "h.png"], ["c.png", "Negative"]]')
    expected = (2 * 0.25 / 1.25 + 2 * 0.5 / 1.5) / 2
    assert bench_accuracy.all_tampered_f1(str(tmp_path / "list.json")) == pytest.approx(expected)

@pytest.mark.parametrize("provider", ["procedural", "decode"])
def test_synth_case(provider):
    from benchmarks import bench_synth
    out = bench_synth.run_case({"provider": provider, "count": 2, "size": 32, "repeat": 1,
                                "threads": 1})
    _check_case(out)
    assert out["imgs_per_s"] == pytest.approx(2 / out["time_s"])


@pytest.mark.parametrize("classes", [None, 4])
def test_ntxent_cases(classes):
    """fastiml and pml compute the same NT-Xent loss on the same SimCLR / class batches."""
    case = {"n": 64, "d": 16, "classes": classes, "repeat": 1, "threads": 1}
    ours = bench_ntxent.run_case({**case, "provider": "fastiml"})
    _check_case(ours)
    assert ours["loss"] > 0
    if HAS_PML:
        theirs = bench_ntxent.run_case({**case, "provider": "pml"})
        _check_case(theirs)
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4)


def test_ntxent_labels_and_memory_guard(tmp_path):
    assert bench_ntxent.make_labels(6, None).tolist() == [0, 1, 2, 0, 1, 2]
    assert bench_ntxent.pair_counts(bench_ntxent.make_labels(6, None)) == (6.0, 24.0)
    assert bench_ntxent.pair_counts(bench_ntxent.make_labels(8, 2)) == (24.0, 32.0)
    with pytest.raises(ValueError, match="even N"):
        bench_ntxent.make_labels(5, None)
    # pml's [positive pairs x negative pairs] matrix at N = 4096, 64 classes: terabytes.
    argv = ["--sizes", "4096", "--providers", "pml", "--in-process", "--no-csv",
            "--json", str(tmp_path / "r.json")]
    assert bench_ntxent.main(argv) == 0
    (result,) = json.loads((tmp_path / "r.json").read_text())["results"]
    assert result["params"]["labels"] == "64 classes"
    assert result["status"].startswith("skipped (") and result["status"].endswith(")")


def test_ntxent_main_in_process(tmp_path):
    csv_path, json_path = tmp_path / "r.csv", tmp_path / "r.json"
    argv = ["--sizes", "64", "--class-sizes", "--repeat", "1", "--threads", "1",
            "--in-process", "--csv", str(csv_path), "--json", str(json_path)]
    assert bench_ntxent.main(argv) == 0
    payload = json.loads(json_path.read_text())
    ours = [r for r in payload["results"] if r["provider"] == "fastiml"][0]
    assert ours["status"] == "ok" and ours["params"]["labels"] == "simclr"
    if HAS_PML:
        # (no memory ratio: fastiml's peak above inputs can be 0 MB at this size)
        for key in ("speedup_vs_pml", "loss_rel_diff_vs_pml"):
            assert key in ours["metrics"], key
        assert ours["metrics"]["loss_rel_diff_vs_pml"] < 1e-4
    assert "| N | labels | fastiml s | pml s |" in payload["table_markdown"]
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and {r["benchmark"] for r in rows} == {"ntxent"}


@pytest.mark.skipif(not HAS_OPEN_CLIP, reason="open_clip_torch not installed")
def test_clip_cases():
    """fastiml and open_clip compute the same CLIP loss on the same features."""
    case = {"b": 64, "d": 32, "repeat": 1, "threads": 1}
    ours = bench_clip.run_case({**case, "provider": "fastiml"})
    theirs = bench_clip.run_case({**case, "provider": "open_clip"})
    _check_case(ours)
    _check_case(theirs)
    assert ours["loss"] > 0 and ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4)


def test_clip_main_in_process(tmp_path):
    json_path = tmp_path / "r.json"
    argv = ["--sizes", "64", "--repeat", "1", "--threads", "1", "--in-process", "--no-csv",
            "--json", str(json_path)]
    if not HAS_OPEN_CLIP:
        argv += ["--providers", "fastiml"]
    assert bench_clip.main(argv) == 0
    payload = json.loads(json_path.read_text())
    ours = [r for r in payload["results"] if r["provider"] == "fastiml"][0]
    assert ours["status"] == "ok"
    if HAS_OPEN_CLIP:
        assert "speedup_vs_open_clip" in ours["metrics"]
        assert ours["metrics"]["loss_rel_diff_vs_open_clip"] < 1e-4
    assert "| B | fastiml s | open_clip s |" in payload["table_markdown"]
    # B = 65536 at 8 GB: fastiml's O(B D) fits, open_clip's B x B logits (~100 GB) do not.
    assert harness.memory_guard(bench_clip.estimate_bytes("fastiml", 65536), 8) is None
    assert harness.memory_guard(bench_clip.estimate_bytes("open_clip", 65536), 8).startswith(
        "skipped (needs ~")


def test_trace_zeroshot_scores_every_tampered_image(tmp_path):
    from benchmarks import trace_zeroshot
    from fastiml.data import synthesize
    from fastiml.engine.pretrain import SHIPPED_INIT
    if not SHIPPED_INIT["camera-trace"].is_file():
        pytest.skip("no shipped camera-trace weights in this checkout")
    r = synthesize(tmp_path / "s", 6, size=48, seed=1, authentic_fraction=0.3)
    out = trace_zeroshot.zero_shot(r["json"], "camera-trace")
    tampered = sum(1 for it in r["items"] if it["mask"] != "Negative")
    assert sum(len(v) for v in out.values()) == tampered
    assert set(out) <= {"splice", "copymove", "inpaint"}
    assert all(0.0 <= a <= 1.0 for v in out.values() for a in v)


# ---------------------------------------------------- --dtypes of bench_clip / bench_siglip

def _clip_loss64(image, text, scale=1 / bench_clip.INIT_TEMPERATURE):
    """open_clip's CLIP loss in float64: cross-entropy both ways over the scaled logits."""
    logits = scale * image.double() @ text.double().T
    target = torch.arange(len(image))
    return float(torch.nn.functional.cross_entropy(logits, target)
                 + torch.nn.functional.cross_entropy(logits.T, target)) / 2


def _siglip_loss64(image, text, scale=10.0, bias=-10.0):
    """SigLIP's loss in float64: -log sigmoid(z (t s + b)) summed over pairs, over B."""
    logits = scale * image.double() @ text.double().T + bias
    z = 2 * torch.eye(len(image), dtype=torch.float64) - 1
    return float(-torch.nn.functional.logsigmoid(z * logits).sum()) / len(image)


@pytest.mark.parametrize("name,loss64,rel", [("clip", _clip_loss64, 1e-5),
                                             ("siglip", _siglip_loss64, 1e-6)])
def test_clip_siglip_dtypes_cast_the_features(tmp_path, name, loss64, rel):
    """--dtypes bfloat16: every provider gets the features in bf16, the rows (JSON, CSV,
    table) say so, and fastiml's loss is the float64 loss of the bf16-rounded features, not
    of the float32 ones (the two differ by 8e-5 / 5e-6 at B = 16)."""
    from benchmarks import bench_siglip
    bench = {"clip": bench_clip, "siglip": bench_siglip}[name]
    b = 16
    image, text = (x.detach() for x in bench_clip.make_features(b, bench_clip.D, "cpu"))
    rounded = loss64(image.bfloat16(), text.bfloat16())
    assert abs(rounded - loss64(image, text)) > 5 * rel * rounded  # the test can tell them apart
    csv_path, json_path = tmp_path / "r.csv", tmp_path / "r.json"
    argv = ["--sizes", str(b), "--dtypes", "bfloat16", "--repeat", "1", "--threads", "1",
            "--in-process", "--csv", str(csv_path), "--json", str(json_path)]
    if not HAS_OPEN_CLIP:
        argv += ["--providers", "fastiml"]
    assert bench.main(argv) == 0
    payload = json.loads(json_path.read_text())
    assert {r["params"]["dtype"] for r in payload["results"]} == {"bfloat16"}
    by = {r["provider"]: r for r in payload["results"]}
    assert all(r["status"] == "ok" for r in by.values()), by
    ours = by["fastiml"]["metrics"]["loss"]
    assert math.isfinite(ours) and ours == pytest.approx(rounded, rel=rel)
    if HAS_OPEN_CLIP:  # its logits are bf16: equal to bf16 rounding
        assert by["open_clip"]["metrics"]["loss"] == pytest.approx(rounded, rel=1e-2)
        assert "speedup_vs_open_clip" in by["fastiml"]["metrics"]
    assert f"| bfloat16 | {b} |" in payload["table_markdown"]
    with open(csv_path, newline="") as f:
        assert {json.loads(r["params"])["dtype"] for r in csv.DictReader(f)} == {"bfloat16"}


def test_clip_dtypes_default_choices_and_estimate():
    args = bench_clip.parser().parse_args([])
    assert args.dtypes == ["float32"]
    assert bench_clip.parser().parse_args(["--dtypes", "float16", "bfloat16"]).dtypes == [
        "float16", "bfloat16"]
    with pytest.raises(SystemExit):  # argparse: "argument --dtypes: invalid choice: 'int8'"
        bench_clip.parser().parse_args(["--dtypes", "int8"])
    # open_clip's B x B matrices are in the features' dtype: at B = 65536 they need ~100 GB in
    # float32 and ~50 GB in bf16 (measured 9.6 bytes per logit at B = 4096), which fits in 90 %
    # of an H100 (gpu_check's share for clip / siglip).
    f32, bf16 = (bench_clip.estimate_bytes("open_clip", 65536, dtype=dt)
                 for dt in (torch.float32, torch.bfloat16))
    assert 90e9 < f32 < 120e9 and 40e9 < bf16 < 60e9
    assert harness.memory_guard(bf16, 0.9 * 85) is None
    assert harness.memory_guard(f32, 0.9 * 85).startswith("skipped (needs ~")
