"""Fine-tune a trained model's decoder alone on its training digits at their MAP codes, and
judge the samples of the refitted prior as `vae-export eval` judges them (EVAL.md, "Copies"):
does a decoder trained where the prior draws move the samples off the front of
`copy_frontier.py`?

The encoder is left as it is. The decoder is trained on the pairs (MAP code, digit) of the
4,500 training digits (the codes the prior is fitted around, found as `vae-export train` finds
them), minibatches of 128, Adam, on the squared error (the Gaussian log p(x|z) up to its scale,
which Adam does not see: sigma plays no part). Then the MAP codes are found again under the
new decoder (at the model's sigma, as `vae-export train` finds them), the prior (10 components
a class) is refitted around them, and for each temperature 10,000 samples are drawn as the
server draws them and decoded by the new decoder.

    python scripts/finetune_decoder.py --run runs/default --model-dir models/default \\
        --json docs/eval/finetune-decoder.json

The first row is the network as trained (epochs 0), the reference.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch
from copy_frontier import JUDGED
from sweep_prior import model_arguments, studied

from vae_core.likelihood import to_unit
from vae_export.evaluate import judged
from vae_export.model import VAE
from vae_export.prior_fit import PriorConfig, fit_prior
from vae_export.train import training_codes


def finetuned(network: VAE, x: torch.Tensor, codes: torch.Tensor, epochs: int, lr: float,
              seed: int = 0, batch: int = 128) -> VAE:
    """A copy of `network` whose decoder has trained `epochs` epochs on the digits x [N, 784]
    in [0, 1] at their codes [N, k] (their MAP codes under `network`), on the squared error."""
    tuned = copy.deepcopy(network)
    opt = torch.optim.Adam(tuned.decoder.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    tuned.decoder.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            images = torch.sigmoid(tuned.decoder(codes[idx]))
            loss = ((images - x[idx]) ** 2).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    tuned.eval()
    return tuned


def main() -> int:
    p = model_arguments(__doc__)
    p.add_argument("--epochs", default="0,60,120", help="comma-separated epochs of fine-tuning")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--temperatures", default="0.7,0.85,0.9,1.0")
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    model, network, train, _, _, judge = studied(args)
    # The MAP codes under the network as trained: what the decoder is tuned at, and the
    # untuned reference's prior.
    start = training_codes(network, train.images, PriorConfig())
    x = torch.from_numpy(to_unit(train.images.reshape(len(train.images), -1)))
    rows = []
    for epochs in (int(e) for e in args.epochs.split(",")):
        t0 = time.perf_counter()
        net = network
        z, logvar = start
        if epochs:
            net = finetuned(network, x, torch.from_numpy(start[0]), epochs, args.lr)
            z, logvar = training_codes(net, train.images, PriorConfig())
        tuned_s = time.perf_counter() - t0
        for t in (float(v) for v in args.temperatures.split(",")):
            prior = fit_prior(z, logvar, train.labels, PriorConfig(temperature=t))
            with torch.no_grad():
                images = torch.sigmoid(net.decoder(torch.from_numpy(
                    prior.latents(0, 0, args.samples)))).numpy()
            verdict = judged(judge, images)
            row = {"epochs": epochs, "temperature": t, **{key: verdict[key] for key in JUDGED},
                   "tuning_seconds": round(tuned_s, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"model_version": model.manifest["model_version"], "samples": args.samples,
              "lr": args.lr, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
