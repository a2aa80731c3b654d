"""Is a BatchNorm shift before a ReLU free for the relative pairing distance? (docs/pairing.md)

Adds c to the BatchNorm bias of SmallCNN's block1 (before its ReLU), re-estimates the later BatchNorm
statistics on the training split (what further training would adapt first), then measures clean and
PGD-20 accuracy (L_inf eps 0.2, step 0.05, random start) and D at block1 (relative_l2) on the 300 test inputs.

    python docs/pairing_bn_shift.py <a digits NF run dir>/checkpoints/final.ckpt
"""

from __future__ import annotations

import sys

import torch

from esq_lightning.artifacts.checkpoint import model_state_dict, read_checkpoint
from esq_lightning.artifacts.loading import build_network
from esq_lightning.attacks import pgd
from esq_lightning.data.digits import DigitsDataModule
from esq_lightning.pairing import forward_with_activations, pairing_distance


def main(ckpt: str) -> None:
    torch.set_num_threads(1)
    dm = DigitsDataModule(batch_size=64, val_size=300, test_size=300, split_seed=0)
    dm.setup("fit")
    dm.setup("test")
    x_train, _ = dm.train_tensors()
    x, y = dm.test_tensors()
    print("| c | clean | PGD-20 | D at block1 (relative_l2) | active units |\n|---|---|---|---|---|")
    for c in (0.0, 1.0, 3.0, 10.0):
        model = build_network({"_target_": "esq_lightning.models.SmallCNN", "name": "small_cnn"})  # NF: full precision
        model.load_state_dict(model_state_dict(read_checkpoint(ckpt)))
        with torch.no_grad():
            model.block1[1].bias += c
            for bn in (model.block2[1], model.block3[1]):
                bn.reset_running_stats()
                bn.momentum = None  # a cumulative average over the whole split
            model.train()
            model.block1[1].eval()
            for i in range(0, len(x_train), 256):
                model(x_train[i : i + 256])
            model.eval()
        x_adv = pgd(
            model,
            x,
            y,
            eps=0.2,
            step_size=0.05,
            steps=20,
            norm="linf",
            random_start=True,
            generator=torch.Generator().manual_seed(0),
        )
        with torch.no_grad():
            z, acts = forward_with_activations(model, x, ["block1"])
            z_adv, acts_adv = forward_with_activations(model, x_adv, ["block1"])
        clean = (z.argmax(1) == y).float().mean().item()
        robust = (z_adv.argmax(1) == y).float().mean().item()
        d = pairing_distance(acts["block1"], acts_adv["block1"]).item()
        active = (acts["block1"] > 0).float().mean().item()
        print(f"| {c:g} | {100 * clean:.1f} | {100 * robust:.1f} | {d:.3f} | {100 * active:.1f}% |")


if __name__ == "__main__":
    main(sys.argv[1])
