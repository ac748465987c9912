"""Side by side on the demo brains: our VQVAE + PatchGAN against MONAI's VQVAE + PatchDiscriminator.

    .venv/bin/python bench/first_stage_speed.py [--BUDGET_SECONDS=150] [--TUNE_SECONDS=30]

Every contestant goes through the same training loop (L1 + VQ loss + hinge GAN with a fixed
weight), data, batch, image size, 16x16 latent grid and codebook (256 x 8), and sees the same
inputs: the slice index z reaches ours through its embeddings (encoder, decoder, PatchGAN) and
MONAI's, which has no conditioning, through an extra input channel of the encoder and the
discriminator holding z / 31; each model also runs without z. Each gets its own learning rate:
the one of LEARNING_RATES with the best validation SSIM after TUNE_SECONDS of training. Every
timed run starts after WARMUP_STEPS untimed steps of a throwaway copy (kernels, allocator), then
trains a fresh, seeded model for its budget. Prints training images/s and test SSIM after
BUDGET_SECONDS, and the share of the CPU's measured peak matmul FLOP/s that our training step
reaches (FLOPs counted by torch.utils.flop_counter). monai is a bench-only dependency
(requirements-dev.txt).
"""
import itertools
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
import model_discriminator  # noqa: E402
import model_VAE  # noqa: E402
from model_discriminator import hinge_discriminator_loss  # noqa: E402

BUDGET_SECONDS = 150.0       # training time of each contestant's final run
TUNE_SECONDS = 30.0          # training time of each candidate learning rate
LEARNING_RATES = (2.5e-4, 5e-4, 1e-3, 2e-3)   # candidates for every contestant (one entry: no tuning)
WARMUP_STEPS = 5             # untimed steps of a throwaway copy before every timed run
BATCH_SIZE = 16
GAN_WEIGHT = 0.01            # fixed generator weight (MONAI's tutorials use 0.01)
THREADS = 2
SEED = 0


class MonaiPair:
    """MONAI's VQVAE (EMA codebook) and PatchDiscriminator with our preset's levels and
    discriminator; `channels` (56, 112) matches our parameter count, (32, 64) is MONAI lean.
    With `z_channel`, encoder and discriminator get z / 31 as a second input channel."""

    def __init__(self, channels, z_channel):
        from monai.networks.nets import VQVAE, PatchDiscriminator as MonaiDiscriminator
        self.z_channel = z_channel
        inputs = 2 if z_channel else 1
        self.model = VQVAE(spatial_dims=2, in_channels=inputs, out_channels=1, channels=channels,
                           num_res_channels=channels, num_res_layers=1,
                           downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)),
                           upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)),
                           num_embeddings=256, embedding_dim=8, output_act="TANH")
        self.discriminator = MonaiDiscriminator(spatial_dims=2, channels=32, in_channels=inputs, num_layers_d=2)

    def _with_z(self, images, zs):
        if not self.z_channel:
            return images
        plane = (zs.float() / (dataset.SLICES_PER_BRAIN - 1))[:, None, None, None].expand_as(images)
        return torch.cat([images, plane], dim=1)

    def reconstruct(self, images, zs):
        return self.model(self._with_z(images, zs))

    def judge(self, images, zs):
        return self.discriminator(self._with_z(images, zs))[-1]


class OurPair:
    """Our CPU preset (pre_train.py defaults, but 256 codes like MONAI's): VQVAE and PatchGAN,
    z-conditioned or not."""

    def __init__(self, z_conditioning):
        config = {name: getattr(pre_train, name) for name in util.config_names(vars(pre_train))}
        config.update(NUM_CODES=256, Z_CONDITIONING=z_conditioning)     # MONAI's codebook size
        self.model = model_VAE.build_model(config)
        self.discriminator = model_discriminator.build_discriminator(config)

    def reconstruct(self, images, zs):
        reconstruction, vq_loss, _ = self.model(images, zs)
        return reconstruction, vq_loss

    def judge(self, images, zs):
        return self.discriminator(images, zs)


CONTESTANTS = {
    "ours, z": lambda: OurPair(True),
    "ours, no z": lambda: OurPair(False),
    "MONAI, z channel": lambda: MonaiPair((56, 112), True),
    "MONAI, no z": lambda: MonaiPair((56, 112), False),
    "MONAI lean, z channel": lambda: MonaiPair((32, 64), True),
}


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
def mean_ssim(pair, loader):
    pair.model.eval()
    scores = [util.reconstruction_ssim(images, pair.reconstruct(images, zs)[0]) for images, _, _, zs in loader]
    pair.model.train()
    return torch.cat(scores).mean().item()


def make_optimizers(pair, lr):
    return [torch.optim.Adam(module.parameters(), lr=lr, betas=(0.5, 0.9))
            for module in (pair.model, pair.discriminator)]


def timed_training(make_pair, lr, train_loader, budget):
    """Warm up on a throwaway pair, then train a fresh seeded one for `budget` seconds:
    (pair, optimizers, training images/s)."""
    throwaway = make_pair()
    optimizers = make_optimizers(throwaway, lr)
    for images, _, _, zs in itertools.islice(train_loader, WARMUP_STEPS):
        training_step(throwaway, optimizers, images, zs)
    util.seed_everything(SEED)
    pair = make_pair()
    optimizers = make_optimizers(pair, lr)
    images_seen, start, epoch = 0, time.time(), 0
    while time.time() - start < budget:
        train_loader.sampler.set_epoch(epoch)
        for images, _, _, zs in train_loader:
            training_step(pair, optimizers, images, zs)
            images_seen += len(images)
            if time.time() - start >= budget:
                break
        epoch += 1
    return pair, optimizers, images_seen / (time.time() - start)


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
    test_loader = dataset.get_dataloader("test", 64, None, pre_train.IMG_SIZE)
    results = {}
    for name, make_pair in CONTESTANTS.items():
        tuning = {}
        if len(LEARNING_RATES) > 1:
            for lr in LEARNING_RATES:
                pair, _, _ = timed_training(make_pair, lr, train_loader, TUNE_SECONDS)
                tuning[lr] = mean_ssim(pair, validate_loader)
            print(f"{name}: validation SSIM after {TUNE_SECONDS:.0f} s at each learning rate: "
                  + ", ".join(f"{lr:g} {ssim:.4f}" for lr, ssim in tuning.items()), flush=True)
        lr = max(tuning, key=tuning.get) if tuning else LEARNING_RATES[0]
        pair, optimizers, images_per_second = timed_training(make_pair, lr, train_loader, BUDGET_SECONDS)
        params = [sum(p.numel() for p in module.parameters()) for module in (pair.model, pair.discriminator)]
        results[name] = (params, lr, images_per_second, mean_ssim(pair, test_loader), pair, optimizers)
        print(f"{name}: learning rate {lr:g}, {images_per_second:.1f} img/s, test SSIM {results[name][3]:.4f}",
              flush=True)

    print(f"\nsame loop, data, batch {BATCH_SIZE}, {pre_train.IMG_SIZE}x{pre_train.IMG_SIZE}, 16x16 latents, "
          f"256 x 8 codebook, {BUDGET_SECONDS:.0f} s of training each after {WARMUP_STEPS} warm-up steps, "
          f"learning rate picked on validate from {LEARNING_RATES} after {TUNE_SECONDS:.0f} s each, {THREADS} threads")
    print(f"{'model':22s} {'params (AE + D)':>16s} {'lr':>7s} {'train img/s':>12s} {'test SSIM':>10s}")
    for name, ((model_params, disc_params), lr, images_per_second, ssim, _, _) in results.items():
        print(f"{name:22s} {model_params / 1e6:6.2f}M + {disc_params / 1e6:.2f}M {lr:7g} {images_per_second:12.1f} "
              f"{ssim:10.4f}")

    peak = peak_matmul_flops()
    _, _, images_per_second, _, pair, optimizers = results["ours, z"]
    images, _, _, zs = next(iter(train_loader))
    flops_per_image = step_flops(pair, optimizers, images, zs) / len(images)
    achieved = flops_per_image * images_per_second
    print(f"\npeak matmul (2048x2048 fp32): {peak / 1e9:.0f} GFLOP/s; our training step: "
          f"{flops_per_image / 1e9:.2f} GFLOP per image x {images_per_second:.1f} img/s = "
          f"{achieved / 1e9:.0f} GFLOP/s = {achieved / peak:.0%} of peak")
