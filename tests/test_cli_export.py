"""The `vae-export` command line, `evaluate`, and the manifest checks that stop a changed
model directory from being trusted."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vae_core.manifest import DECODER, ENCODER, MANIFEST, ManifestError, load_manifest
from vae_core.onnx_model import OnnxVAE
from vae_export.__main__ import build_parser, main
from vae_export.evaluate import FASHION_MNIST_DIR, evaluate
from vae_export.model import VAEConfig
from vae_export.train import TrainConfig

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
             "--threads", "--samples", "--classifier", "--pictures"],
    "classifier": ["--out", "--data", "--test", "--epochs", "--seed", "--quiet"],
    "cas": ["--model-dir", "--data", "--n", "--seed", "--json", "--quiet"],
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
        assert action.help, f"{action.option_strings} has no help text"


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
    (["--prior-temperature", "1.5"], "prior temperature must be in (0, 1], not 1.5"),
    (["--prior-temperature", "0"], "prior temperature must be in (0, 1], not 0.0"),
    (["--prior-components", "0"], "components and samples_per_digit must be >= 1"),
    (["--latent-dim", "0"], "latent_dim must be >= 1"),
    (["--hidden", "64,x"], "--hidden takes layer widths separated by commas, not '64,x'"),
    (["--perturb", "1"], "perturb must be in [0, 1), got 1.0"),
    (["--perturb", "-0.1"], "perturb must be in [0, 1), got -0.1"),
])
def test_train_setting_out_of_range_is_one_line_and_exit_2(
        flags: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--out", str(tmp_path / "run"), *flags]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"vae-export train: error: {says}\n"
    assert not (tmp_path / "run").exists()


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
        (_drop("calibration"), ["'calibration'"]),
        (lambda m: m["files"].pop(ENCODER), ["no entry for encoder.onnx"]),
        (_set_decoder_width, ["decoder.onnx", "x_mean", "783"]),
        (_rename_encoder_output, ["encoder.onnx", "'mean'"]),
    ],
    ids=["format-version", "no-calibration-key", "unlisted-encoder", "decoder-width",
         "encoder-output-name"],
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
