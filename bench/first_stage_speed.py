"""Side by side on the demo brains: our VQVAE + PatchGAN against MONAI's VQVAE + PatchDiscriminator.

    .venv/bin/python bench/first_stage_speed.py [--BUDGET_SECONDS=150]

Both go through the same training loop (L1 + VQ loss + hinge GAN with a fixed weight), same
data, batch, learning rate, image size and 16x16 latent grid, same codebook (256 x 8). Prints
training images/s, validation SSIM after the same wall-clock budget, and the share of the CPU's
measured peak matmul FLOP/s that our training step reaches (FLOPs counted by
torch.utils.flop_counter). monai is a bench-only dependency (requirements-dev.txt).
"""
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dataset  # noqa: E402
import pre_train  # noqa: E402
import util  # noqa: E402
from model_discriminator import hinge_discriminator_loss  # noqa: E402

BUDGET_SECONDS = 150.0       # training time per model
BATCH_SIZE = 16
LR = pre_train.LR             # our preset's learning rate, for both
GAN_WEIGHT = 0.01            # fixed generator weight (MONAI's tutorials use 0.01)
THREADS = 2
SEED = 0


class MonaiPair:
    """MONAI's VQVAE (EMA codebook) and PatchDiscriminator with our preset's levels and
    discriminator; `channels` (56, 112) matches our parameter count, (32, 64) is MONAI lean."""

    def __init__(self, channels):
        from monai.networks.nets import VQVAE, PatchDiscriminator as MonaiDiscriminator
        self.model = VQVAE(spatial_dims=2, in_channels=1, out_channels=1, channels=channels,
                           num_res_channels=channels, num_res_layers=1,
                           downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)),
                           upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)),
                           num_embeddings=256, embedding_dim=8, output_act="TANH")
        self.discriminator = MonaiDiscriminator(spatial_dims=2, channels=32, in_channels=1, num_layers_d=2)

    def reconstruct(self, images, zs):
        reconstruction, vq_loss = self.model(images)
        return reconstruction, vq_loss

    def judge(self, images, zs):
        return self.discriminator(images)[-1]


class OurPair:
    """Our CPU preset (pre_train.py defaults, but 256 codes like MONAI's): z-conditioned VQVAE and PatchGAN."""

    def __init__(self):
        config = {name: getattr(pre_train, name) for name in util.config_names(vars(pre_train))}
        self.model = pre_train.build_model(dict(config, NUM_CODES=256))   # MONAI's codebook size
        self.discriminator = pre_train.build_discriminator(config)

    def reconstruct(self, images, zs):
        reconstruction, vq_loss, _ = self.model(images, zs)
        return reconstruction, vq_loss

    def judge(self, images, zs):
        return self.discriminator(images, zs)


def training_step(pair, optimizers, images, zs):
    reconstruction, vq_loss = pair.reconstruct(images, zs)
    loss = F.l1_loss(reconstruction, images) + vq_loss - GAN_WEIGHT * pair.judge(reconstruction, zs).mean()
    optimizers[0].zero_grad(set_to_none=True)
    loss.backward()
    optimizers[0].step()
    logits = pair.judge(torch.cat([images, reconstruction.detach()]), torch.cat([zs, zs]))
    d_loss = hinge_discriminator_loss(*logits.chunk(2))
    optimizers[1].zero_grad(set_to_none=True)
    d_loss.backward()
    optimizers[1].step()


@torch.no_grad()
def validation_ssim(pair, loader):
    pair.model.eval()
    scores = [util.reconstruction_ssim(images, pair.reconstruct(images, zs)[0]) for images, _, _, zs in loader]
    pair.model.train()
    return torch.cat(scores).mean().item()


def train_for_budget(pair, train_loader, budget):
    optimizers = [torch.optim.Adam(module.parameters(), lr=LR, betas=(0.5, 0.9))
                  for module in (pair.model, pair.discriminator)]
    images_seen, start, epoch = 0, time.time(), 0
    while time.time() - start < budget:
        train_loader.sampler.set_epoch(epoch)
        for images, _, _, zs in train_loader:
            training_step(pair, optimizers, images, zs)
            images_seen += len(images)
            if time.time() - start >= budget:
                break
        epoch += 1
    return images_seen / (time.time() - start), optimizers


def peak_matmul_flops(size=2048, repeats=10):
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.time()
    for _ in range(repeats):
        a @ b
    return 2 * size ** 3 * repeats / (time.time() - start)


def step_flops(pair, optimizers, images, zs):
    with FlopCounterMode(display=False) as counter:
        training_step(pair, optimizers, images, zs)
    return counter.get_total_flops()


if __name__ == "__main__":
    util.apply_overrides(globals())
    torch.set_num_threads(THREADS)
    train_loader = dataset.get_dataloader("train", BATCH_SIZE, None, pre_train.IMG_SIZE, seed=SEED)
    validate_loader = dataset.get_dataloader("validate", 64, None, pre_train.IMG_SIZE)
    results = {}
    contestants = (("ours", OurPair), ("MONAI", lambda: MonaiPair((56, 112))),
                   ("MONAI lean", lambda: MonaiPair((32, 64))))
    for name, make_pair in contestants:
        util.seed_everything(SEED)
        pair = make_pair()
        params = sum(p.numel() for p in pair.model.parameters())
        print(f"training {name} ({params / 1e6:.2f}M + {sum(p.numel() for p in pair.discriminator.parameters()) / 1e6:.2f}M "
              f"params) for {BUDGET_SECONDS:.0f} s ...", flush=True)
        images_per_second, optimizers = train_for_budget(pair, train_loader, BUDGET_SECONDS)
        results[name] = (params, images_per_second, validation_ssim(pair, validate_loader), pair, optimizers)

    print(f"\nsame loop, data, batch {BATCH_SIZE}, {pre_train.IMG_SIZE}x{pre_train.IMG_SIZE}, 16x16 latents, "
          f"256 x 8 codebook, {BUDGET_SECONDS:.0f} s of training each, {THREADS} threads")
    print(f"{'model':11s} {'params':>8s} {'train img/s':>12s} {'val SSIM':>9s}")
    for name, (params, images_per_second, ssim, _, _) in results.items():
        print(f"{name:11s} {params / 1e6:7.2f}M {images_per_second:12.1f} {ssim:9.4f}")

    peak = peak_matmul_flops()
    _, images_per_second, _, pair, optimizers = results["ours"]
    images, _, _, zs = next(iter(train_loader))
    flops_per_image = step_flops(pair, optimizers, images, zs) / len(images)
    achieved = flops_per_image * images_per_second
    print(f"\npeak matmul (2048x2048 fp32): {peak / 1e9:.0f} GFLOP/s; our training step: "
          f"{flops_per_image / 1e9:.2f} GFLOP per image x {images_per_second:.1f} img/s = "
          f"{achieved / 1e9:.0f} GFLOP/s = {achieved / peak:.0%} of peak")
