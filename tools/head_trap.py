"""Inspect a trained model for the "p <= 0.5" trap of a bias-free head (docs/models.md, "The output bias").

    python tools/head_trap.py results/models/unet3d/split4/seed0/model.pt results/preprocessed/demo-0{01,02}.npz

For each volume: the highest lesion probability anywhere, how many voxels sit at p = 0.5 exactly
(all decoder features off) and what share of them are lesion voxels, and the Dice at p > 0.5
against the best threshold. For the head: per input channel of its 3x3x3 conv, the net
lesion-minus-background weight of the composed head (3x3x3 conv, then 1x1x1 conv) for a
constant feature, and the output bias. Prediction: tiles of the training crop, overlap 0.25,
Gaussian blending (the study's policy).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from rsanet.checks import load_config
from rsanet.inference import Predictor
from rsanet.metrics import dice_from_counts
from rsanet.volumes import Preprocessed

REPO = Path(__file__).resolve().parents[1]


def main(model_path: str, volumes: list[str]) -> None:
    torch.set_num_threads(1)
    predict = load_config(REPO / "config" / "config.yaml", REPO / "workflow" / "schemas" / "config.schema.yaml")["predict"]
    predictor = Predictor.from_model_files([model_path], predict, "cpu")  # the study's policy
    model = predictor.models[0]
    conv, last = model.head[0].weight.detach(), model.head[1].weight.detach().flatten(1)  # (C, C, 3,3,3), (2, C)
    net = (last[1] - last[0]) @ conv.sum(dim=(2, 3, 4))  # (C,): lesion - background per input channel
    bias = None if model.head[1].bias is None else model.head[1].bias.detach().tolist()
    print(f"{model_path}: head net lesion weights per channel {np.round(net.numpy(), 4).tolist()}; "
          f"{int((net > 0).sum())} of {len(net)} positive; output bias {bias}")
    for path in volumes:
        pre = Preprocessed.load(path)
        prob = predictor.probability(pre.image)
        truth = pre.lesions > 0
        half = np.isclose(prob, 0.5, atol=1e-6)

        def dice(t: float) -> float:
            pred = prob > t
            tp = int((pred & truth).sum())
            return dice_from_counts(tp, int(pred.sum()) - tp, int(truth.sum()) - tp)

        best = max((dice(t), t) for t in np.arange(0.05, 0.96, 0.05))
        print(f"  {path}: max p {prob.max():.4f}; {int(half.sum())} voxels at p = 0.5 "
              f"({100 * truth[half].mean() if half.any() else 0:.0f} % lesion); Dice at p > 0.5 {dice(0.5):.3f}, "
              f"best {best[0]:.3f} at p > {best[1]:.2f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
