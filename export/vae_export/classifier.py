"""The judge of generated digits: a small CNN classifier trained, seeded and with augmentation,
on the 5,000 real training digits, and never on generated images. Its softmax says whether a
sample is recognisably a digit and of which class; its 128-unit penultimate layer is the
feature space of the Fréchet distance and of the nearest-neighbour check (vae_export.quality).

`vae-export classifier` trains it and writes its weights; evaluation loads them, training
them first where they are missing.
"""

from __future__ import annotations

import json
import pickle
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from vae_core import likelihood as lk
from vae_core.files import check_writable, replacing
from vae_export.augment import augment
from vae_export.config import ClassifierConfig
from vae_export.data import DataError, Digits, load_dataset

WEIGHTS = "classifier.pt"
FEATURES = 128


class DigitCNN(nn.Module):
    """28x28 -> conv32 -> pool -> conv64 -> pool -> conv128 -> pool -> fc128 (features) -> 10."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, padding=1)
        self.b1 = nn.BatchNorm2d(32)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1)
        self.b2 = nn.BatchNorm2d(64)
        self.c3 = nn.Conv2d(64, 128, 3, padding=1)
        self.b3 = nn.BatchNorm2d(128)
        self.fc = nn.Linear(128 * 3 * 3, FEATURES)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(FEATURES, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, 1, 28, 28] in [0, 1] -> penultimate features [N, 128] (after ReLU)."""
        h = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)  # 14 x 14
        h = F.max_pool2d(F.relu(self.b2(self.c2(h))), 2)  # 7 x 7
        h = F.max_pool2d(F.relu(self.b3(self.c3(h))), 2)  # 3 x 3
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.features(x)))


def train_classifier(out: Path, cfg: ClassifierConfig | None = None,
                     digits: Digits | None = None, test: Digits | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Train on `digits` (default: cfg.data), write out/classifier.pt and summary.json;
    with `test`, the summary holds its accuracy."""
    cfg = cfg or ClassifierConfig()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    digits = load_dataset(cfg.data) if digits is None else digits
    out.mkdir(parents=True, exist_ok=True)  # once the data is good, and tried before training
    check_writable(out / WEIGHTS)
    x = torch.from_numpy(lk.to_unit(digits.images)).unsqueeze(1)
    y = torch.from_numpy(digits.labels.astype(np.int64))
    net = DigitCNN()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(x) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr,
                                                total_steps=cfg.epochs * steps_per_epoch)
    t0 = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        perm = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            xb = augment(x[idx], gen, rot_deg=cfg.rot_deg, shift_px=cfg.shift_px,
                         scale=cfg.scale, shear_deg=cfg.shear_deg, p=cfg.aug_p)
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if progress:
            print(f"classifier epoch {epoch}/{cfg.epochs}: loss {loss.item():.3f}", flush=True)
    net.eval()
    summary: dict[str, Any] = {"train_seconds": round(time.perf_counter() - t0, 1),
                               "n_train": len(digits), "data_source": digits.source,
                               "config": asdict(cfg)}
    if test is not None:
        probs, _ = classify(net, test.images)
        summary["test_accuracy"] = float((probs.argmax(1) == test.labels).mean())
        summary["test_source"] = test.source
    # Whole or not at all: a half-written classifier.pt would fail every later eval.
    with replacing(out / WEIGHTS) as f:
        torch.save({"state_dict": net.state_dict(), "summary": summary}, f)
    with replacing(out / "summary.json", "w", encoding="utf-8") as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    return summary


def load_classifier(path: Path) -> tuple[DigitCNN, dict[str, Any]]:
    """The classifier of `path` (a classifier.pt or the folder holding one), in eval mode,
    and its training summary."""
    if path.is_dir():
        path = path / WEIGHTS
    net = DigitCNN()
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(blob["state_dict"])
    except (RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as exc:
        raise DataError(f"{path}: not a classifier written by `vae-export classifier` "
                        f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                        ) from None
    net.eval()
    return net, blob.get("summary", {})


@torch.no_grad()
def classify(net: DigitCNN, images: np.ndarray, batch: int = 1000
             ) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 784] or [N, 28, 28], uint8 or float in [0, 1] -> (softmax [N, 10] float64,
    penultimate features [N, 128] float64)."""
    arr = np.asarray(images)
    x = lk.to_unit(arr) if arr.dtype == np.uint8 else arr.astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(x).reshape(-1, 1, 28, 28))
    probs, feats = [], []
    for start in range(0, len(t), batch):
        f = net.features(t[start : start + batch])
        probs.append(F.softmax(net.out(f), dim=-1).numpy())
        feats.append(f.numpy())
    if not probs:
        return np.zeros((0, 10)), np.zeros((0, FEATURES))
    return (np.concatenate(probs).astype(np.float64),
            np.concatenate(feats).astype(np.float64))
