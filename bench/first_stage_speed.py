"""Side by side on the demo brains: our VQVAE + PatchGAN against MONAI's VQVAE + PatchDiscriminator.

    .venv/bin/python bench/first_stage_speed.py [--BUDGET_SECONDS=150] [--TUNE_SECONDS=30]
    python bench/first_stage_speed.py config/first_stage_speed_gpu.py     # 256x256 on a GPU

Every contestant goes through the same training loop (L1 + VQ loss + hinge GAN with a fixed
weight), data, batch, image size, latent grid (16x16 in both presets; contestants of different
grids are refused) and codebook (256 x 8), and sees the same
inputs: the slice index z reaches ours through its embeddings (encoder, decoder, PatchGAN) and
MONAI's, which has no conditioning, through an extra input channel of the encoder and the
discriminator holding z / 31; each model also runs without z. Each gets its own learning rate:
the one of LEARNING_RATES with the best validation SSIM after TUNE_SECONDS of training. Every
timed run starts after WARMUP_STEPS untimed steps of a throwaway copy (kernels, allocator), then
trains a fresh, seeded model for its budget. Prints training images/s and test SSIM after
BUDGET_SECONDS, and the share of the CPU's measured peak matmul FLOP/s that our training step
reaches (FLOPs counted by torch.utils.flop_counter). On a GPU every contestant trains under bf16
autocast with fused Adam (as pre_train.py does there), the clock stops only after the queued
kernels finish, and the GPU's utilisation (NVML, sampled every step, where the nvidia-ml-py
package is installed) is printed too; a "CUDA
graph" contestant replays its whole training step as one graph there (util.CudaGraphStep, as
pre_train.py does; its eager warm-up steps and capture count inside its budget; on a CPU it runs
eagerly). monai is a bench-only dependency (requirements-dev.txt).
"""
import functools
import itertools
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dataset  # noqa: E402
import pre_train  # noqa: E402
import util  # noqa: E402
import model_discriminator  # noqa: E402
import model_VAE  # noqa: E402
from model_discriminator import hinge_discriminator_loss  # noqa: E402
from module import GroupNorm  # noqa: E402

# ----------------------------------------------------------------------------- config
FIRST_STAGE_PRESET = "config/pre_train_grid16.py"   # a config/pre_train*.py file for our contestant ("" =
                             # pre_train.py's CPU preset); its IMG_SIZE is everyone's image size. The race is on
                             # a 16x16 grid, so the default is the CPU preset's 16x16 variant
CONTESTANT_NAMES = ("ours, z", "ours, no z", "MONAI, z channel", "MONAI, no z", "MONAI lean, z channel")
                             # which of CONTESTANTS run (() = all): the README's five; the others probe the GPU step
                             # (config/first_stage_speed_gpu.py), the 4x4-patch ones at 256x256 only
MONAI_CHANNELS = (56, 112)   # MONAI VQVAE's channels per stride-2 level: (56, 112) matches config/pre_train_grid16.py's size
MONAI_RES_LAYERS = 1
MONAI_DISC_CHANNELS = 32
MONAI_DISC_LAYERS = 2
MONAI_OUTPUT_ACT = "TANH"    # MONAI VQVAE's output activation: "TANH" (into the images' [-1, 1]) or None (linear,
                             # MONAI's default): at 256x256 tanh saturated at -1, the black background, within
                             # 15 steps and never left it (config/first_stage_speed_gpu.py)
BUDGET_SECONDS = 150.0       # training time of each contestant's final run
PROFILE_STEPS = 0            # > 0: then profile this many more training steps of each contestant and print
                             # its costliest operators (self time on the GPU, or on the CPU without one)
TUNE_SECONDS = 30.0          # training time of each candidate learning rate
LEARNING_RATES = (2.5e-4, 5e-4, 1e-3, 2e-3)   # candidates for every contestant (one entry: no tuning)
WARMUP_STEPS = 5             # untimed steps of a throwaway copy before every timed run
BATCH_SIZE = 16
GAN_WEIGHT = 0.01            # fixed generator weight (MONAI's tutorials use 0.01)
THREADS = 2
LOADER_WORKERS = 0           # DataLoader worker processes for the training batches (0: the main process
                             # builds them, between kernel launches)
SEED = 0


class MonaiPair:
    """MONAI's VQVAE (EMA codebook) with one stride-2 level per entry of `channels` and its
    PatchDiscriminator: MONAI_CHANNELS match our preset's parameter count, (32, 64) is MONAI
    lean at 64x64. With `z_channel`, encoder and discriminator get z / 31 as a second input channel;
    `cuda_graph`: its training steps replayed as CUDA graphs, as ours can be."""

    def __init__(self, channels, z_channel, cuda_graph=False):
        from monai.networks.nets import VQVAE, PatchDiscriminator as MonaiDiscriminator
        self.z_channel, self.cuda_graph, self.levels = z_channel, cuda_graph, len(channels)
        inputs = 2 if z_channel else 1
        self.model = VQVAE(spatial_dims=2, in_channels=inputs, out_channels=1, channels=channels,
                           num_res_channels=channels, num_res_layers=MONAI_RES_LAYERS,
                           downsample_parameters=((2, 4, 1, 1),) * len(channels),
                           upsample_parameters=((2, 4, 1, 1, 0),) * len(channels),
                           num_embeddings=256, embedding_dim=8, output_act=MONAI_OUTPUT_ACT)
        self.discriminator = MonaiDiscriminator(spatial_dims=2, channels=MONAI_DISC_CHANNELS, in_channels=inputs,
                                                num_layers_d=MONAI_DISC_LAYERS)

    def _with_z(self, images, zs):
        if not self.z_channel:
            return images
        plane = (zs.float() / (dataset.SLICES_PER_BRAIN - 1))[:, None, None, None].expand_as(images)
        return torch.cat([images, plane], dim=1)

    def reconstruct(self, images, zs):
        return self.model(self._with_z(images, zs))

    def judge(self, images, zs):
        return self.discriminator(self._with_z(images, zs))[-1]

    def latent_grid(self, img_size):
        return img_size // 2 ** self.levels       # one stride-2 level per entry of its channels


class OurPair:
    """Our preset (pre_train.py's constants after FIRST_STAGE_PRESET, but 256 codes like MONAI's):
    VQVAE and PatchGAN, z-conditioned or not; `changes` to the preset, e.g. 4x4 patches. Probes of
    where our GPU step loses time (its GroupNorm, SiLU and z-scaling passes over 128x128
    activations, and cuDNN's NCHW <-> NHWC conversions): `fp32_norms` makes the norms plain
    nn.GroupNorm, which CUDA autocast runs in fp32 (ours stay bf16); `channels_last` stores weights
    and activations NHWC; `compiled` runs both networks' training steps through torch.compile with
    static shapes (kernel fusion, and inductor's own norms, which read NHWC without converting; its
    compile time is in the warm-up); `cuda_graph` replays the whole training step as one CUDA graph
    (util.CudaGraphStep, as pre_train.py on a GPU). Evaluation runs eagerly: compiling eval mode
    too would double the compile time for a few batches."""

    def __init__(self, z_conditioning, fp32_norms=False, channels_last=False, compiled=False, cuda_graph=False,
                 **changes):
        config = {name: getattr(pre_train, name) for name in util.config_names(vars(pre_train))}
        config.update(NUM_CODES=256, Z_CONDITIONING=z_conditioning, **changes)     # MONAI's codebook size
        self.model = model_VAE.build_model(config)
        self.discriminator = model_discriminator.build_discriminator(config)
        if fp32_norms:
            for module in (*self.model.modules(), *self.discriminator.modules()):
                if isinstance(module, GroupNorm):
                    module.__class__ = nn.GroupNorm     # same parameters, the parent's forward
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
            self.discriminator.to(memory_format=torch.channels_last)
        self.cuda_graph = cuda_graph
        self.train_model, self.train_discriminator = (torch.compile(module, dynamic=False) if compiled else module
                                                      for module in (self.model, self.discriminator))

    def reconstruct(self, images, zs):
        run_model = self.train_model if self.model.training else self.model
        reconstruction, vq_loss, _ = run_model(images.contiguous(memory_format=self.memory_format), zs)
        return reconstruction, vq_loss

    def judge(self, images, zs):
        return self.train_discriminator(images.contiguous(memory_format=self.memory_format), zs)

    def latent_grid(self, img_size):
        return self.model.latent_shape(img_size)[-1]


CONTESTANTS = {
    "ours, z": lambda: OurPair(True),
    "ours, no z": lambda: OurPair(False),
    "ours, z, fp32 norms": lambda: OurPair(True, fp32_norms=True),
    "ours, z, channels-last": lambda: OurPair(True, channels_last=True),
    "ours, z, compiled": lambda: OurPair(True, compiled=True),
    "ours, z, compiled, channels-last": lambda: OurPair(True, channels_last=True, compiled=True),
    "ours, z, CUDA graph": lambda: OurPair(True, cuda_graph=True),
    "ours, z, 4x4 patches": lambda: OurPair(True, PATCH_SIZE=4, CHANNEL_MULTS=(2, 2, 4)),
    "ours, z, 4x4 patches, CUDA graph": lambda: OurPair(True, cuda_graph=True, PATCH_SIZE=4, CHANNEL_MULTS=(2, 2, 4)),
    "MONAI, z channel": lambda: MonaiPair(MONAI_CHANNELS, True),
    "MONAI, z channel, CUDA graph": lambda: MonaiPair(MONAI_CHANNELS, True, cuda_graph=True),
    "MONAI, no z": lambda: MonaiPair(MONAI_CHANNELS, False),
    "MONAI lean, z channel": lambda: MonaiPair((32, 64), True),
}


def autocast(device):
    """bf16 autocast on a GPU (as pre_train.py); fp32 on the CPU, as the README's CPU rows were
    measured (pre_train.py now uses bf16 on CPUs that have it: see USE_BF16)."""
    return util.autocast(device, torch.bfloat16 if device.type == "cuda" else None)


def training_step(pair, optimizers, images, zs):
    with autocast(images.device), util.frozen(pair.discriminator):
        reconstruction, vq_loss = pair.reconstruct(images, zs)
        loss = (F.l1_loss(reconstruction.float(), images) + vq_loss
                - GAN_WEIGHT * pair.judge(reconstruction, zs).float().mean())
    optimizers[0].zero_grad(set_to_none=True)
    loss.backward()
    optimizers[0].step()
    with autocast(images.device):
        logits = pair.judge(torch.cat([images, reconstruction.detach()]), torch.cat([zs, zs]))
        d_loss = hinge_discriminator_loss(*logits.float().chunk(2))
    optimizers[1].zero_grad(set_to_none=True)
    d_loss.backward()
    optimizers[1].step()


@torch.no_grad()
def mean_ssim(pair, loader, device):
    pair.model.eval()
    scores = []
    for images, _, _, zs in loader:
        images, zs = images.to(device), zs.to(device)
        with autocast(device):
            reconstruction = pair.reconstruct(images, zs)[0]
        scores.append(util.reconstruction_ssim(images, reconstruction.float()))
    pair.model.train()
    return torch.cat(scores).mean().item()


def make_pair(name, device):
    pair = CONTESTANTS[name]()
    pair.model.to(device)
    pair.discriminator.to(device)
    return pair


def make_optimizers(pair, lr, device):
    return [torch.optim.Adam(module.parameters(), lr=lr, betas=(0.5, 0.9), fused=device.type == "cuda")
            for module in (pair.model, pair.discriminator)]


def make_training_step(pair, optimizers, device):
    """training_step on this pair, as a function of (images, zs): replayed as a CUDA graph for a
    `cuda_graph` contestant on a GPU (its first steps eager, then one capture: both inside the
    timed budget)."""
    return util.training_step_runner(functools.partial(training_step, pair, optimizers), optimizers,
                                     pair.cuda_graph and device.type == "cuda")


def gpu_utilisation(device):
    """A function returning the GPU's utilisation in %, or None on the CPU or where NVML (the
    nvidia-ml-py package, which torch does not install) is missing: the bench runs without it."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.utilization(device)
    except (ImportError, RuntimeError) as error:
        print(f"GPU utilisation not sampled ({error.__class__.__name__}: {error}); pip install nvidia-ml-py for it")
        return None
    return functools.partial(torch.cuda.utilization, device)


def check_one_grid(names, img_size):
    """The latent grid every contestant in `names` encodes img_size x img_size slices to; a race
    on different grids would compare different compressions, so another grid is refused."""
    grids = {name: CONTESTANTS[name]().latent_grid(img_size) for name in names}
    if len(set(grids.values())) > 1:
        raise util.UserError(f"CONTESTANT_NAMES: their latent grids at {img_size}x{img_size} differ ("
                             + "; ".join(f"{name!r} {grid}x{grid}" for name, grid in grids.items())
                             + "); race contestants of one grid (the 4x4-patch ones are for 256x256, "
                               "config/first_stage_speed_gpu.py)")
    return next(iter(grids.values()))


def timed_training(name, lr, train_loader, budget, device, utilisation_now):
    """Warm up on a throwaway pair, then train a fresh seeded one for `budget` seconds: (pair,
    optimizers, its training step, training images/s, mean GPU utilisation in % or None without
    `utilisation_now`, gpu_utilisation's function)."""
    warmup_start = time.time()
    throwaway = make_pair(name, device)
    run_step = make_training_step(throwaway, make_optimizers(throwaway, lr, device), device)
    for images, _, _, zs in itertools.islice(train_loader, WARMUP_STEPS):
        run_step(images.to(device), zs.to(device))
    del throwaway, run_step
    util.synchronize(device)
    print(f"{name}: {WARMUP_STEPS} warm-up steps took {time.time() - warmup_start:.1f} s", flush=True)
    util.seed_everything(SEED)
    pair = make_pair(name, device)
    optimizers = make_optimizers(pair, lr, device)
    run_step = make_training_step(pair, optimizers, device)
    images_seen, start, epoch, utilisation = 0, time.time(), 0, []
    while time.time() - start < budget:
        train_loader.sampler.set_epoch(epoch)
        for images, _, _, zs in train_loader:
            images, zs = images.to(device, non_blocking=True), zs.to(device, non_blocking=True)
            run_step(images, zs)
            images_seen += len(images)
            if utilisation_now is not None:
                utilisation.append(utilisation_now())
            if time.time() - start >= budget:
                break
        epoch += 1
    util.synchronize(device)    # the queued kernels belong to the budget too
    seconds = time.time() - start
    return (pair, optimizers, run_step, images_seen / seconds,
            sum(utilisation) / len(utilisation) if utilisation else None)


def print_profile(name, run_step, train_loader, device):
    """PROFILE_STEPS training steps under torch.profiler: the 12 operators with the most self time."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as profiler:
        for images, _, _, zs in itertools.islice(train_loader, PROFILE_STEPS):
            run_step(images.to(device), zs.to(device))
        util.synchronize(device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"{name}: {PROFILE_STEPS} profiled steps\n"
          + profiler.key_averages().table(sort_by=sort_by, row_limit=12, max_name_column_width=60), flush=True)


def peak_matmul_flops(device, repeats=10):
    """Measured matmul FLOP/s: fp32 2048^2 on the CPU, bf16 8192^2 on a GPU (the dtypes each trains in)."""
    size, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    util.synchronize(device)
    start = time.time()
    for _ in range(repeats):
        a @ b
    util.synchronize(device)
    return 2 * size ** 3 * repeats / (time.time() - start)


def step_flops(pair, optimizers, images, zs):
    with FlopCounterMode(display=False) as counter:
        training_step(pair, optimizers, images, zs)
    return counter.get_total_flops()


if __name__ == "__main__":
    util.apply_overrides(globals(), other_types={"MONAI_OUTPUT_ACT": type(None)})
    if FIRST_STAGE_PRESET:
        util.apply_overrides(vars(pre_train), [FIRST_STAGE_PRESET], other_types=pre_train.OTHER_TYPES)
    unknown = [name for name in CONTESTANT_NAMES if name not in CONTESTANTS]
    if unknown:
        raise util.UserError(f"CONTESTANT_NAMES: unknown {unknown}; expected names of {list(CONTESTANTS)}")
    img_size = pre_train.IMG_SIZE
    grid = check_one_grid(CONTESTANT_NAMES or CONTESTANTS, img_size)
    device = util.get_device()
    torch.set_num_threads(THREADS)
    utilisation_now = gpu_utilisation(device)
    train_loader = dataset.get_dataloader("train", BATCH_SIZE, None, img_size, seed=SEED, num_workers=LOADER_WORKERS)
    validate_loader = dataset.get_dataloader("validate", 64, None, img_size)
    test_loader = dataset.get_dataloader("test", 64, None, img_size)
    results = {}
    for name in CONTESTANT_NAMES or CONTESTANTS:
        tuning = {}
        try:     # a probe that fails (compiling, capturing, memory) says why, and the others still run
            if len(LEARNING_RATES) > 1:
                for lr in LEARNING_RATES:
                    pair = timed_training(name, lr, train_loader, TUNE_SECONDS, device, utilisation_now)[0]
                    tuning[lr] = mean_ssim(pair, validate_loader, device)
                print(f"{name}: validation SSIM after {TUNE_SECONDS:.0f} s at each learning rate: "
                      + ", ".join(f"{lr:g} {ssim:.4f}" for lr, ssim in tuning.items()), flush=True)
            lr = max(tuning, key=tuning.get) if tuning else LEARNING_RATES[0]
            pair, optimizers, run_step, images_per_second, utilisation = timed_training(
                name, lr, train_loader, BUDGET_SECONDS, device, utilisation_now)
        except RuntimeError as error:
            print(f"{name}: failed: {error}", flush=True)
            continue
        params = [sum(p.numel() for p in module.parameters()) for module in (pair.model, pair.discriminator)]
        results[name] = (params, lr, images_per_second, utilisation, mean_ssim(pair, test_loader, device), pair,
                         optimizers)
        print(f"{name}: learning rate {lr:g}, {images_per_second:.1f} img/s"
              + (f", GPU busy {utilisation:.0f}%" if utilisation is not None else "")
              + f", test SSIM {results[name][4]:.4f}", flush=True)
        if PROFILE_STEPS:
            print_profile(name, run_step, train_loader, device)

    where = torch.cuda.get_device_name(device) + ", bf16 autocast, fused Adam" if device.type == "cuda" \
        else f"CPU, {THREADS} threads"
    print(f"\nsame loop, data, batch {BATCH_SIZE}, {img_size}x{img_size}, {grid}x{grid} latents, "
          f"256 x 8 codebook, {BUDGET_SECONDS:.0f} s of training each after {WARMUP_STEPS} warm-up steps, "
          + (f"learning rate picked on validate from {LEARNING_RATES} after {TUNE_SECONDS:.0f} s each, "
             if len(LEARNING_RATES) > 1 else f"learning rate {LEARNING_RATES[0]:g}, ") + where)
    print(f"{'model':36s} {'params (AE + D)':>16s} {'lr':>7s} {'train img/s':>12s} {'GPU busy':>9s} {'test SSIM':>10s}")
    for name, ((model_params, disc_params), lr, images_per_second, utilisation, ssim, _, _) in results.items():
        busy = f"{utilisation:.0f}%" if utilisation is not None else "-"
        print(f"{name:36s} {model_params / 1e6:6.2f}M + {disc_params / 1e6:.2f}M {lr:7g} {images_per_second:12.1f} "
              f"{busy:>9s} {ssim:10.4f}")

    if "ours, z" in results:
        peak = peak_matmul_flops(device)
        _, _, images_per_second, _, _, pair, optimizers = results["ours, z"]
        images, _, _, zs = next(iter(train_loader))
        flops_per_image = step_flops(pair, optimizers, images.to(device), zs.to(device)) / len(images)
        achieved = flops_per_image * images_per_second
        print(f"\npeak matmul ({'bf16 8192' if device.type == 'cuda' else 'fp32 2048'}): {peak / 1e12:.2f} TFLOP/s; "
              f"our training step: {flops_per_image / 1e9:.2f} GFLOP per image x {images_per_second:.1f} img/s = "
              f"{achieved / 1e12:.3f} TFLOP/s = {achieved / peak:.1%} of peak")
