"""The ``fastiml`` command, run as ``python -m fastiml`` in subprocesses: the train -> eval ->
predict path, and every bad input ending in exactly one ``fastiml: error:`` line (no traceback)
and a non-zero exit status.

The subprocesses run a few at a time (each one imports torch), in two waves: the cases that need
no checkpoint alongside a real ``train``, then those that use its checkpoint.
"""
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from fastiml.data import synthesize

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ("pixel_f1", "pixel_iou", "pixel_auc", "image_auc", "image_acc")


def _env(pythonpath=ROOT):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(pythonpath)
    env.pop("FASTIML_DEBUG", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(args, cwd=None, env=None):
    p = subprocess.run([sys.executable, "-m", "fastiml", *map(str, args)], capture_output=True,
                       text=True, cwd=cwd or ROOT, env=env or _env(), timeout=600)
    return p


def _run_all(cases, workers=4):
    with ThreadPoolExecutor(max_workers=workers) as ex:
        futures = {name: ex.submit(_run, *spec) if isinstance(spec, tuple) else ex.submit(_run, spec)
                   for name, spec in cases.items()}
        return {name: f.result() for name, f in futures.items()}


TINY_CONFIG = """
[data]
train = "{train}"
size = 32
augment = false
preload = true
num_workers = 0
[train]
method = "{method}"
steps = 2
batch_size = 2
warmup_steps = 0
log_every = 1
threads = 1
progress = false
[method]
model = {{ base_width = 8, decoder_channels = 16, proj_dim = 16 }}
[output]
dir = "{out}"
"""

# name -> (argv with {placeholders}, substring expected in the error line)
NO_CKPT_CASES = {
    "no_command": ([], "required"),
    "unknown_command": (["frobnicate"], "invalid choice"),
    "train_without_config": (["train"], "needs --config"),
    "config_missing": (["train", "--config", "{tmp}/missing.toml"], "config file not found"),
    "config_bad_key": (["train", "--config", "{tmp}/bad_key.toml"], "train.lrr"),
    "override_bad_key": (["train", "--config", "{tmp}/ok.toml", "--set", "train.nope=1"],
                         "train.nope"),
    "unknown_method": (["train", "--config", "{tmp}/ok.toml", "--set", "train.method=magic"],
                       "unknown method 'magic'"),
    "train_data_missing": (["train", "--config", "{tmp}/ok.toml", "--set",
                            "data.train={tmp}/nowhere"], "does not exist"),
    "resume_not_checkpoint": (["train", "--config", "{tmp}/ok.toml", "--resume",
                               "{tmp}/garbage.pt"], "not a fastiml checkpoint"),
    "eval_missing_checkpoint": (["eval", "--checkpoint", "{tmp}/missing.pt", "--data",
                                 "{tmp}/data", "--out", "{tmp}/e"], "checkpoint not found"),
    "eval_garbage_checkpoint": (["eval", "--checkpoint", "{tmp}/garbage.pt", "--data",
                                 "{tmp}/data", "--out", "{tmp}/e"], "not a fastiml checkpoint"),
    "eval_foreign_checkpoint": (["eval", "--checkpoint", "{tmp}/foreign.pt", "--data",
                                 "{tmp}/data", "--out", "{tmp}/e"], "not a fastiml checkpoint"),
    "eval_missing_args": (["eval", "--checkpoint", "{tmp}/garbage.pt"], "required"),
    "synth_bad_n": (["synth", "--out", "{tmp}/s", "--n", "0"], "--n must be"),
    "synth_bad_n_type": (["synth", "--out", "{tmp}/s", "--n", "many"], "invalid int"),
    "synth_missing_source": (["synth", "--out", "{tmp}/s", "--n", "2", "--source",
                              "{tmp}/nowhere"], "source folder not found"),
    "demo_unknown_method": (["demo", "--out", "{tmp}/d", "--method", "xyz"], "invalid choice"),
    "demo_bad_minutes": (["demo", "--out", "{tmp}/d", "--minutes", "-1"], "--minutes"),
    "demo_unknown_demo_key": (["demo", "--out", "{tmp}/d", "--set", "demo.n_tarin=5"],
                              "unknown key(s) in [demo]"),
    "demo_bad_train_key": (["demo", "--out", "{tmp}/d", "--set", "train.nope=1"], "train.nope"),
    "bench_unknown": (["bench", "no_such_bench"], "unknown benchmark 'no_such_bench'"),
    # bce has no configurable loss: its [method].loss table was once ignored (exit 0)
    "bce_loss_table": (["train", "--config", "{tmp}/ok.toml", "--set", "method.loss.tau=-1",
                        "--set", "method.loss.nosuch=1"],
                       "method 'bce' reads no [method].loss table; got key(s) nosuch, tau"),
    "method_model_key": (["train", "--config", "{tmp}/ok.toml", "--set", "method.model.nosuch=1"],
                         "method 'bce' does not read [method].model key(s) nosuch"),
}
CKPT_CASES = {
    "eval_missing_data": (["eval", "--checkpoint", "{ckpt}", "--data", "{tmp}/nowhere", "--out",
                           "{tmp}/e"], "data set not found"),
    "predict_missing_input": (["predict", "--checkpoint", "{ckpt}", "--input", "{tmp}/nowhere.png",
                               "--out", "{tmp}/p"], "input not found"),
    "predict_corrupt_image": (["predict", "--checkpoint", "{ckpt}", "--input", "{tmp}/corrupt.png",
                               "--out", "{tmp}/p"], "could not be decoded"),
    "predict_wrong_format": (["predict", "--checkpoint", "{ckpt}", "--input", "{tmp}/notes.txt",
                              "--out", "{tmp}/p"], "could not be decoded"),
    "predict_empty_folder": (["predict", "--checkpoint", "{ckpt}", "--input", "{tmp}/empty",
                              "--out", "{tmp}/p"], "no image files"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    synthesize(tmp / "data", 4, size=32, seed=5, authentic_fraction=0.25)
    (tmp / "empty").mkdir()
    (tmp / "ok.toml").write_text(TINY_CONFIG.format(train=tmp / "data" / "list.json",
                                                    method="bce", out=tmp / "run"))
    (tmp / "bad_key.toml").write_text("[train]\nlrr = 0.1\n")
    (tmp / "garbage.pt").write_bytes(b"\x00\x01 not a checkpoint")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp / "foreign.pt")
    (tmp / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (tmp / "notes.txt").write_text("hello")
    rgb = (np.random.default_rng(0).random((37, 53, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp / "photo.png"), rgb)
    (tmp / "photos").mkdir()
    cv2.imwrite(str(tmp / "photos" / "a.png"), rgb)
    cv2.imwrite(str(tmp / "photos" / "b.jpg"), rgb[:29, :41])

    (tmp / "mixed").mkdir()  # a.png and a.jpg share a stem; c.png cannot be read
    cv2.imwrite(str(tmp / "mixed" / "a.png"), rgb)
    cv2.imwrite(str(tmp / "mixed" / "a.jpg"), rgb[:31, :43])
    (tmp / "mixed" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (tmp / "other").mkdir()  # other/a.png: the same name as photos/a.png
    cv2.imwrite(str(tmp / "other" / "a.png"), rgb[:23, :19])

    fill = lambda argv, ckpt="": [a.format(tmp=tmp, ckpt=ckpt) for a in argv]  # noqa: E731
    wave1 = {name: fill(argv) for name, (argv, _) in NO_CKPT_CASES.items()}
    wave1["train"] = ["train", "--config", str(tmp / "ok.toml")]
    wave1["train_highpass"] = ["train", "--config", str(tmp / "ok.toml"), "--set",
                               "data.input_filter=highpass", "--set", f"output.dir={tmp / 'hp'}"]
    wave1["synth"] = ["synth", "--out", str(tmp / "synth"), "--n", "3", "--size", "24"]
    # a folder of photographs instead of a data set: forged on the fly (data.source_dir)
    wave1["train_source"] = ["train", "--config", str(tmp / "ok.toml"), "--set", "data.train=",
                             "--set", f"data.source_dir={tmp / 'photos'}", "--set",
                             "data.source_n=5", "--set", f"output.dir={tmp / 'run_src'}"]
    results = _run_all(wave1)

    ckpt = tmp / "run" / "model.pt"
    wave2 = {name: fill(argv, ckpt) for name, (argv, _) in CKPT_CASES.items()}
    wave2["eval"] = ["eval", "--checkpoint", str(ckpt), "--data", str(tmp / "data"), "--out",
                     str(tmp / "eval"), "--workers", "0"]
    wave2["predict_file"] = ["predict", "--checkpoint", str(ckpt), "--input",
                             str(tmp / "photo.png"), "--out", str(tmp / "pred1")]
    wave2["predict_dir"] = ["predict", "--checkpoint", str(ckpt), "--input", str(tmp / "photos"),
                            "--out", str(tmp / "pred2")]
    wave2["predict_mixed"] = ["predict", "--checkpoint", str(ckpt), "--input", str(tmp / "mixed"),
                              str(tmp / "photos" / "a.png"), str(tmp / "other" / "a.png"),
                              "--out", str(tmp / "pred3")]
    hp = tmp / "hp" / "model.pt"
    wave2["eval_highpass"] = ["eval", "--checkpoint", str(hp), "--data", str(tmp / "data"),
                              "--out", str(tmp / "eval_hp"), "--workers", "0",
                              "--resolution", "train"]
    wave2["predict_highpass"] = ["predict", "--checkpoint", str(hp), "--input",
                                 str(tmp / "photo.png"), "--out", str(tmp / "pred_hp"),
                                 "--resolution", "train"]
    wave2["resume"] = ["train", "--resume", str(tmp / "run" / "model.pt"), "--set",
                       f"output.dir={tmp / 'resumed'}", "--set", "train.steps=3"]
    results.update(_run_all(wave2))
    return tmp, results


def _ok(p):
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_help_and_version():
    p = _run(["--help"])
    assert p.returncode == 0
    for cmd in ("train", "eval", "predict", "synth", "demo", "bench", "selftest"):
        assert cmd in p.stdout
    assert _run(["--version"]).stdout.startswith("fastiml ")


def test_train_eval_predict(runs):
    tmp, r = runs
    _ok(r["train"])
    assert (tmp / "run" / "model.pt").is_file() and (tmp / "run" / "train_log.jsonl").is_file()
    assert "checkpoint:" in r["train"].stdout

    _ok(r["eval"])
    metrics = json.loads((tmp / "eval" / "metrics.json").read_text())
    for key in REQUIRED:
        assert key in metrics
    assert metrics["n_images"] == 4 and metrics["method"] == "bce"
    assert metrics["resolution"] == "native"  # the default: the images' own pixels
    # per_image.csv: one row per image, forgery kinds from the synth set's meta.json
    rows = (tmp / "eval" / "per_image.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["file", "kind", "tampered", "pixel_f1"] and len(rows) == 5
    meta = {m["image"]: m["kind"] for m in json.loads((tmp / "data" / "meta.json").read_text())}
    for line in rows[1:]:
        f, kind, tampered = line.split(",")[:3]
        assert kind == meta[f] and tampered == str(int(kind != "authentic"))
    assert set(metrics["by_kind"]) == {k for k in meta.values() if k != "authentic"}

    _ok(r["predict_file"])
    mask = cv2.imread(str(tmp / "pred1" / "photo_mask.png"), cv2.IMREAD_UNCHANGED)
    over = cv2.imread(str(tmp / "pred1" / "photo_overlay.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (37, 53) and set(np.unique(mask)) <= {0, 255}
    assert over.shape == (37, 53, 3)

    _ok(r["predict_dir"])
    assert cv2.imread(str(tmp / "pred2" / "a_mask.png"), cv2.IMREAD_UNCHANGED).shape == (37, 53)
    assert cv2.imread(str(tmp / "pred2" / "b_mask.png"), cv2.IMREAD_UNCHANGED).shape == (29, 41)
    assert (tmp / "pred2" / "b_overlay.png").is_file()


def test_train_on_a_folder_of_photographs(runs):
    tmp, r = runs
    _ok(r["train_source"])
    meta = json.loads((tmp / "run_src" / "data" / "source" / "meta.json").read_text())
    assert len(meta) == 5 and (tmp / "run_src" / "model.pt").is_file()
    state = torch.load(tmp / "run_src" / "model.pt", weights_only=True)
    assert state["config"]["data"]["train"].endswith("list.json")


def test_predict_carries_on_and_never_overwrites(runs):
    tmp, r = runs
    p = r["predict_mixed"]
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert f"fastiml: warning: skipped {tmp / 'mixed' / 'c.png'}" in p.stderr
    assert "fastiml: error: 1 of 5 input(s) could not be read" in p.stderr
    # Five inputs, three named a: each gets its own outputs, at its own size.
    shapes = {name: cv2.imread(str(tmp / "pred3" / f"{name}_mask.png"), cv2.IMREAD_UNCHANGED).shape
              for name in ("a_png_1", "a_jpg", "a_png_2", "a_png_3")}
    assert shapes == {"a_png_1": (37, 53), "a_jpg": (31, 43), "a_png_2": (37, 53),
                      "a_png_3": (23, 19)}
    assert len(list((tmp / "pred3").iterdir())) == 8


def test_eval_and_predict_use_the_checkpoints_input_filter(runs):
    """A model trained on highpass residuals is evaluated and applied on residuals: the command's
    outputs equal the in-process ones with input_filter "highpass", not those without."""
    from fastiml.engine import build_dataset, evaluate, model_from_checkpoint, predict_image
    from fastiml.engine.report import heatmap_overlay
    tmp, r = runs
    _ok(r["train_highpass"])
    _ok(r["eval_highpass"])
    _ok(r["predict_highpass"])
    model, method, state = model_from_checkpoint(tmp / "hp" / "model.pt")
    assert state["config"]["data"]["input_filter"] == "highpass"
    ds = build_dataset(str(tmp / "data"), state["config"]["data"], train=False)
    saved = json.loads((tmp / "eval_hp" / "metrics.json").read_text())
    assert saved["skipped"] == []
    ref = {kind: evaluate(model, method, ds, batch_size=8, input_filter_kind=kind)
           for kind in ("highpass", "none")}
    assert saved["pixel_auc"] == pytest.approx(ref["highpass"]["pixel_auc"], abs=1e-6)
    assert abs(saved["pixel_auc"] - ref["none"]["pixel_auc"]) > 1e-4

    img = cv2.cvtColor(cv2.imread(str(tmp / "photo.png")), cv2.COLOR_BGR2RGB)
    over = cv2.cvtColor(cv2.imread(str(tmp / "pred_hp" / "photo_overlay.png")), cv2.COLOR_BGR2RGB)
    diff = {kind: np.abs(over.astype(int) - heatmap_overlay(img, predict_image(
                model, method, img, size=32, mode="resize", input_filter_kind=kind)).astype(int))
            for kind in ("highpass", "none")}
    assert diff["highpass"].max() <= 1 and diff["none"].max() > 1


def test_resume_from_the_command_line(runs):
    tmp, r = runs
    _ok(r["resume"])
    steps = [json.loads(line)["step"] for line in
             (tmp / "resumed" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [3]


def test_synth(runs):
    tmp, r = runs
    _ok(r["synth"])
    pairs = json.loads((tmp / "synth" / "list.json").read_text())
    assert len(pairs) == 3


def test_eval_records_its_copy_move_setting(runs, tmp_path, capsys):
    """The default fuses copy-move matching (the checkpoint's eval.copy_move); --copy-move off
    scores the network alone; metrics.json and the printed line say which."""
    from fastiml.cli import main
    tmp, r = runs
    _ok(r["eval"])
    assert json.loads((tmp / "eval" / "metrics.json").read_text())["copy_move"] == "keypoints"
    assert "copy-move matching fused" in r["eval"].stdout + r["eval"].stderr
    code = main(["eval", "--checkpoint", str(tmp / "run" / "model.pt"), "--data", str(tmp / "data"),
                 "--out", str(tmp_path / "off"), "--workers", "0", "--copy-move", "off"])
    assert code == 0 and "copy-move" not in capsys.readouterr().out
    assert json.loads((tmp_path / "off" / "metrics.json").read_text())["copy_move"] == "off"


def test_eval_stops_at_a_file_that_breaks_after_listing(runs, monkeypatch, capsys):
    """A file corrupted after the data set was listed: one error line naming it, and no
    metrics.json or per_image.csv -- the next item in its place would count one image twice and
    shift every later row of per_image.csv onto the wrong file name."""
    import fastiml.data
    from fastiml.cli import main
    tmp, r = runs
    _ok(r["train"])
    data = tmp / "data_breaks"
    shutil.copytree(tmp / "data", data)
    broken = []

    class BreaksAfterListing(fastiml.data.ForgeryDataset):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            broken.append(self.samples[1][0])
            Path(broken[-1]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)

    monkeypatch.setattr(fastiml.data, "ForgeryDataset", BreaksAfterListing)
    out = tmp / "eval_breaks"
    code = main(["eval", "--checkpoint", str(tmp / "run" / "model.pt"), "--data", str(data),
                 "--out", str(out), "--workers", "0", "--batch-size", "1"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fastiml: error:")]
    assert code != 0 and len(errors) == 1, err
    assert broken[0] in errors[0] and "could not be decoded" in errors[0], errors[0]
    assert not (out / "per_image.csv").exists() and not (out / "metrics.json").exists()


@pytest.mark.parametrize("method,options,named", [
    ("bce", {"loss": {"tau": -1, "nosuch": 1}},
     "reads no [method].loss table; got key(s) nosuch, tau"),
    ("bce", {"loss": 0.1}, "[method].loss must be a table"),
    ("ncl", {"loss": {"patch": 2, "nosuch": 1}}, "does not read [method].loss key(s) nosuch;"),
    ("ncl", {"lambda_pivot": 1.0}, "does not read [method] key(s) lambda_pivot"),
    ("mpc", {"loss": {"max_pixel": 10}}, "does not read [method].loss key(s) max_pixel;"),
    ("mpc", {"model": {"width": 3}}, "does not read [method].model key(s) width;"),
])
def test_method_keys_the_method_does_not_read_are_errors(method, options, named):
    from fastiml import methods
    with pytest.raises(ValueError) as e:
        methods.build(method, **options)
    assert str(e.value).startswith(f"method {method!r}") and named in str(e.value), e.value


def test_method_keys_the_method_reads_are_taken():
    from fastiml import methods
    assert methods.build("ncl", loss={"tau": 0.2, "patch": 2}).loss.tau == 0.2
    assert methods.build("mpc", loss={"max_pixels": 7}).loss.max_pixels == 7
    bce = methods.build("bce", model={"base_width": 8, "decoder_channels": 16}, loss={})
    assert bce.build_model().feat_channels == 16


@pytest.mark.parametrize("name", sorted(NO_CKPT_CASES) + sorted(CKPT_CASES))
def test_bad_input_is_one_error_line(runs, name):
    _, r = runs
    p = r[name]
    needle = {**NO_CKPT_CASES, **CKPT_CASES}[name][1]
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("fastiml: error:")]
    assert len(errors) == 1, p.stderr
    assert needle in errors[0], errors[0]
    assert not [line for line in p.stderr.splitlines()
                if line.strip() and not line.startswith(("fastiml: error:", "fastiml: warning:"))], \
        p.stderr


def test_bench_without_benchmarks_folder(tmp_path):
    # An installed package has no benchmarks/ next to it: copy the package alone elsewhere.
    shutil.copytree(ROOT / "fastiml", tmp_path / "fastiml",
                    ignore=shutil.ignore_patterns("__pycache__"))
    p = _run(["bench"], cwd=tmp_path, env=_env(tmp_path))
    assert p.returncode != 0 and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastiml: error:")
    assert "benchmarks folder is not there" in lines[0]
