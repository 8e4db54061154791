"""manifest.json: what a model directory holds, and the checks a server runs before trusting it.

The standard library only (the calibration's checks, numpy's, are imported when asked for):
training writes it, the server and evaluation check it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

# 2: the model version names the served figures (likelihood, sigma, calibration) beside the
# files; 1 (still read): the files alone, so that two exports of one run, with and without
# calibration, shared a version while scoring differently.
FORMAT_VERSION = 2
READ_FORMATS = (1, 2)
MANIFEST = "manifest.json"
ENCODER = "encoder.onnx"
DECODER = "decoder.onnx"
PRIOR_FILE = "prior.npz"  # a learned prior (vae_core.prior); without it, N(0, I)
# The decoder's likelihoods (vae_core.likelihood scores them; it takes these names from here,
# which needs no numpy).
GAUSSIAN, BERNOULLI = "gaussian", "bernoulli"
LIKELIHOODS = (GAUSSIAN, BERNOULLI)
PRIOR_KINDS = ("standard", "mixture")


# Bounds of what a model directory may declare, checked before anything is loaded: a directory
# may come from elsewhere (a model image), and a figure past them would only cost memory and
# time (an identity of 10^6 x 10^6) before failing.
MAX_MANIFEST_BYTES = 1 << 20
MAX_FILE_BYTES = 2 << 30
MAX_LATENT_DIM = 4096
MIN_SIGMA = 1e-6  # below it, sigma^2 and the Gaussian's log density lose their meaning
PIXELS = 28 * 28


class ManifestError(ValueError):
    """The model directory cannot be trusted: a missing file, a hash or shape mismatch."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# The manifest's entries besides its files that change a reply of the same files: the scores
# (likelihood, sigma) and the anomaly percentiles (calibration).
VERSIONED_ENTRIES = ("likelihood", "sigma", "calibration")


def model_version(manifest: Mapping[str, Any]) -> str:
    """The model version `vae-export onnx` writes: the first 16 hex digits of the sha256 of the
    listed files' sha256s, joined in the manifest's order, then (format 2) the canonical JSON
    of VERSIONED_ENTRIES. A changed file, list of files, scoring sigma or calibration is
    another model: a cache of replies, or an image tagged with the version, never mixes two."""
    files = manifest["files"]
    joined = "".join(str(entry["sha256"]) for entry in files.values())
    if manifest.get("format_version") != 1:
        served = {key: manifest.get(key) for key in VERSIONED_ENTRIES}
        joined += json.dumps(served, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def load_manifest(model_dir: str | Path, verify_hashes: bool = True) -> dict[str, Any]:
    """Read and check manifest.json (`check_manifest`)."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path}: missing (is {model_dir} an exported model directory?)")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path}: {size} bytes; a manifest is at most "
                            f"{MAX_MANIFEST_BYTES} (GetModelInfo sends it whole)")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
                            ) from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    except (ValueError, RecursionError) as exc:  # an integer of 5,000 digits; [[[[...
        raise ManifestError(f"{path}: not JSON this code reads ({exc})") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot be read ({exc.strerror})") from None
    check_manifest(manifest, model_dir, verify_hashes, where=path)
    return manifest


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> TypeGuard[int | float]:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def check_manifest(manifest: Any, model_dir: str | Path, verify_hashes: bool = True,
                   where: str | Path | None = None) -> None:
    """Check a manifest (parsed JSON) against itself and its model directory: format version,
    required keys and their types, every listed file present with the sha256 the manifest gives,
    the model version those hashes and its VERSIONED_ENTRIES give, the ONNX inputs and outputs
    it declares of the widths its latent_dim and image pixels say, its prior's kind the files
    it lists, and its calibration tables. Each fault is a ManifestError of one line."""
    model_dir = Path(model_dir)
    path = where if where is not None else model_dir / MANIFEST

    def fail(msg: str) -> ManifestError:
        return ManifestError(f"{path}: {msg}")

    if not isinstance(manifest, dict):
        raise fail(f"a JSON {type(manifest).__name__}, not an object")
    format_version = manifest.get("format_version")
    if type(format_version) is not int or format_version not in READ_FORMATS:
        raise fail(f"format_version {format_version!r}, this code reads "
                   f"{' and '.join(map(str, READ_FORMATS))}")
    for key in ("model_version", "latent_dim", "likelihood", "files", "image", "calibration"):
        if key not in manifest:
            raise fail(f"no {key!r} entry")
    files = manifest["files"]
    if not isinstance(files, dict):
        raise fail(f"files is a JSON {type(files).__name__}, not an object of file entries")
    for name in (ENCODER, DECODER):
        if name not in files:
            raise fail(f"files has no entry for {name}")
    for name, entry in files.items():
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise fail(f"files lists {name!r}: not a file name in the model directory")
        sha = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(sha, str) or len(sha) != 64 or set(sha) - set("0123456789abcdef"):
            raise fail(f"files[{name!r}] has no sha256 of 64 hex digits")
    latent_dim = manifest["latent_dim"]
    if not _is_int(latent_dim) or not 1 <= latent_dim <= MAX_LATENT_DIM:
        raise fail(f"latent_dim {latent_dim!r}: not a whole number in 1 .. {MAX_LATENT_DIM}")
    likelihood = manifest["likelihood"]
    if likelihood not in LIKELIHOODS:
        raise fail(f"likelihood {likelihood!r}: this code reads {', '.join(LIKELIHOODS)}")
    sigma = manifest.get("sigma")
    if (likelihood == GAUSSIAN or sigma is not None) and not (
            _is_number(sigma) and MIN_SIGMA <= sigma <= 1 / MIN_SIGMA):
        raise fail(f"sigma {sigma!r}: the Gaussian decoder's standard deviation must be a "
                   f"number in {MIN_SIGMA:g} .. {1 / MIN_SIGMA:g}")
    image = manifest["image"]
    pixels = image.get("pixels") if isinstance(image, dict) else None
    if pixels != PIXELS or type(pixels) is not int:
        raise fail(f"image.pixels {pixels!r}: the images served are 28 x 28, {PIXELS} pixels")

    # The inputs and outputs the code runs, of the widths the manifest says: a latent_dim or
    # image.pixels at odds with the models is refused here, not by a broadcast error later
    # (open_sessions checks the declared shapes against the models themselves).
    widths = {"latent_dim": latent_dim, "image.pixels": pixels}
    needed = {ENCODER: {"inputs": [("x", "image.pixels")],
                        "outputs": [("mu", "latent_dim"), ("logvar", "latent_dim")]},
              DECODER: {"inputs": [("z", "latent_dim")],
                        "outputs": [("x_mean", "image.pixels")]
                        + ([("logits", "image.pixels")] if likelihood == BERNOULLI else [])}}
    for name, kinds in needed.items():
        for kind, specs in kinds.items():
            declared = files[name].get(kind)
            if not isinstance(declared, list) or not all(
                    isinstance(d, dict) and isinstance(d.get("name"), str)
                    and isinstance(d.get("shape"), list) for d in declared):
                raise fail(f"files[{name!r}] has no {kind} list of {{name, shape}} entries")
            shapes = {d["name"]: d["shape"] for d in declared}
            for io_name, field in specs:
                if io_name not in shapes:
                    raise fail(f"files[{name!r}] declares {kind} {sorted(shapes)}, not "
                               f"{io_name!r} (a {likelihood} model's {name} has it)")
                shape = shapes[io_name]
                if len(shape) != 2 or shape[1] != widths[field]:
                    raise fail(f"{field} {widths[field]} disagrees with {name}'s {kind[:-1]} "
                               f"{io_name!r} of shape {shape}")

    prior_kind(manifest, model_dir, where=path)
    if manifest["calibration"] is not None:
        from vae_core.calibration import Calibration  # numpy: only when there is a table

        try:
            Calibration(manifest["calibration"])
        except ManifestError as exc:
            raise fail(str(exc)) from None

    # After the entries' own checks, so that a malformed entry is named as such.
    want = model_version(manifest)
    if manifest["model_version"] != want:
        named = "files' hashes" + ("" if manifest["format_version"] == 1
                                   else ", likelihood, sigma and calibration")
        raise fail(f"model_version {manifest['model_version']!r} is not the one its {named} "
                   f"give ({want}): the manifest was changed after export")

    for name, entry in files.items():
        file = model_dir / name
        if file.is_symlink():
            raise ManifestError(f"{file}: a symbolic link; the model's files must be in its "
                                "directory")
        if not file.is_file():
            raise ManifestError(f"{file}: listed in the manifest but missing")
        size = file.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ManifestError(f"{file}: {size} bytes; a model file is at most "
                                f"{MAX_FILE_BYTES} (2 GiB, ONNX's own limit)")
        if verify_hashes:
            got = sha256_file(file)
            if got != entry["sha256"]:
                raise ManifestError(
                    f"{file}: sha256 {got[:16]}... does not match the manifest's "
                    f"{entry['sha256'][:16]}... (the file changed after export)"
                )


def prior_kind(manifest: Mapping[str, Any], model_dir: str | Path,
               where: str | Path | None = None) -> str:
    """"mixture" or "standard": the prior a manifest declares, its `prior.kind` and its files
    agreeing (a manifest without a prior entry goes by its files). A prior file in the model
    directory that the manifest does not list is refused too: the model would not be the one
    exported."""
    path = where if where is not None else Path(model_dir) / MANIFEST
    files = manifest.get("files")
    listed = isinstance(files, dict) and PRIOR_FILE in files
    entry = manifest.get("prior")
    if entry is None:
        kind = "mixture" if listed else "standard"
    elif not isinstance(entry, dict) or entry.get("kind") not in PRIOR_KINDS:
        got = entry.get("kind") if isinstance(entry, dict) else entry
        raise ManifestError(f"{path}: prior kind {got!r}: this code reads "
                            f"{', '.join(PRIOR_KINDS)}")
    else:
        kind = entry["kind"]
    if kind == "mixture" and not listed:
        raise ManifestError(f"{path}: prior kind 'mixture', but files has no entry for "
                            f"{PRIOR_FILE}")
    if kind == "standard" and listed:
        raise ManifestError(f"{path}: prior kind 'standard', but files lists {PRIOR_FILE}")
    if not listed and (Path(model_dir) / PRIOR_FILE).exists():
        raise ManifestError(f"{path}: {Path(model_dir) / PRIOR_FILE} lies in the model "
                            f"directory but the manifest does not list it")
    return kind


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
    """Compare an ONNX Runtime session's inputs/outputs (NodeArg lists) with the manifest:
    the same names and widths, float32 tensors, a batch axis of any size, and no input the
    manifest does not declare (the code feeds those it declares, and no other)."""
    extra = sorted({a.name for a in inputs} - {d["name"] for d in entry["inputs"]})
    if extra:
        raise ManifestError(f"{name}: the model takes inputs the manifest does not declare: "
                            f"{extra}")
    for kind, declared, actual in (("input", entry["inputs"], inputs),
                                   ("output", entry["outputs"], outputs)):
        names = {d["name"] for d in declared}
        for a in actual:
            if a.name in names and (
                    a.type != "tensor(float)" or not a.shape or isinstance(a.shape[0], int)):
                raise ManifestError(f"{name}: {kind} {a.name!r} is {a.type} of shape "
                                    f"{list(a.shape)}; the code runs float32 tensors with a "
                                    "batch axis of any size")
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
