"""manifest.json: what a model directory holds, and the checks a server runs before trusting it.

The standard library only: training writes it, the server and evaluation check it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ENCODER = "encoder.onnx"
DECODER = "decoder.onnx"


class ManifestError(ValueError):
    """The model directory cannot be trusted: a missing file, a hash or shape mismatch."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest(model_dir: str | Path, verify_hashes: bool = True) -> dict[str, Any]:
    """Read and check manifest.json: format version, required keys, every listed file
    present with the sha256 the manifest gives."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path}: missing (is {model_dir} an exported model directory?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"{path}: format_version {manifest.get('format_version')!r}, this code reads "
            f"{FORMAT_VERSION}"
        )
    for key in ("model_version", "latent_dim", "likelihood", "files", "image", "calibration"):
        if key not in manifest:
            raise ManifestError(f"{path}: no {key!r} entry")
    for name in (ENCODER, DECODER):
        if name not in manifest["files"]:
            raise ManifestError(f"{path}: files has no entry for {name}")
    for name, entry in manifest["files"].items():
        file = model_dir / name
        if not file.is_file():
            raise ManifestError(f"{file}: listed in the manifest but missing")
        if verify_hashes:
            got = sha256_file(file)
            if got != entry["sha256"]:
                raise ManifestError(
                    f"{file}: sha256 {got[:16]}... does not match the manifest's "
                    f"{entry['sha256'][:16]}... (the file changed after export)"
                )
    return manifest


@dataclass(frozen=True)
class ModelSpec:
    """What serving and scoring read from a checked manifest."""

    version: str
    latent_dim: int
    likelihood: str
    sigma: float | None  # the Gaussian decoder's; None for the Bernoulli decoder
    pixels: int

    @classmethod
    def of(cls, manifest: dict[str, Any]) -> ModelSpec:
        sigma = manifest.get("sigma")
        return cls(version=str(manifest["model_version"]),
                   latent_dim=int(manifest["latent_dim"]),
                   likelihood=str(manifest["likelihood"]),
                   sigma=None if sigma is None else float(sigma),
                   pixels=int(manifest["image"]["pixels"]))


def check_session_io(name: str, entry: dict[str, Any], inputs: list[Any], outputs: list[Any]) -> None:
    """Compare an ONNX Runtime session's inputs/outputs (NodeArg lists) with the manifest."""
    for kind, declared, actual in (("input", entry["inputs"], inputs),
                                   ("output", entry["outputs"], outputs)):
        got = {a.name: list(a.shape) for a in actual}
        for spec in declared:
            if spec["name"] not in got:
                raise ManifestError(
                    f"{name}: the manifest declares {kind} {spec['name']!r}, the model has "
                    f"{sorted(got)}"
                )
            shape = got[spec["name"]]
            want = spec["shape"]
            # The batch axis is symbolic ("N" or a dim_param); every other axis must match.
            if len(shape) != len(want) or list(shape[1:]) != list(want[1:]):
                raise ManifestError(
                    f"{name}: {kind} {spec['name']!r} has shape {shape}, the manifest says {want}"
                )
