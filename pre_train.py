"""First stage: train a VQVAE-GAN or VAE-GAN on 2-D brain slices, conditioned on the slice index z.

    python pre_train.py                          # CPU preset below, on the built-in demo brains
    python pre_train.py --MODE=VAE               # the VAE-GAN
    python pre_train.py config/pre_train_oasis_gpu.py --DATA_DIR=/data/oasis   # the original's size
    torchrun --nproc_per_node=2 pre_train.py     # DistributedDataParallel, same script

Losses (taming-transformers style): L1 reconstruction + VQ commitment (VQVAE, always on) or
cyclically annealed KL (VAE); after GAN_START_STEP, the hinge PatchGAN generator term on
reconstructions and on images decoded from random latents, weighted by the adaptive weight.
Each epoch writes log/<run>.log, grids in visualize/ and model_ckpt/<run>_last.pt (plus
_best.pt, by validation SSIM); re-running resumes from _last.pt. At the end the best epoch is
scored once on the test split and log/<run>_summary.json is written.
"""
import functools
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import dataset
import realism
import util
from logger import TrainingLog
from model_discriminator import adaptive_gan_weight, build_discriminator, hinge_discriminator_loss
from model_VAE import VQVAE, build_model, evaluate_reconstructions
from module import code_counts_per_position, codebook_stats

# ----------------------------------------------------------------------------- config (CPU preset)
MODE = "VQVAE"               # "VQVAE" or "VAE"
RUN_NAME = ""                # names checkpoints, logs and images; "" = mode in lower case
DATA_DIR = None              # OASIS-layout folder; None = the built-in demo brains
IMG_SIZE = 64                # 64 on CPU; the original used 256
TRAIN_SPLIT = "train"        # "train": best epoch by validate SSIM, test scored once at the end;
                             # "train_and_validate": the original's way, no model selection
# model
Z_CONDITIONING = True        # condition encoder, decoder and discriminator on the slice index
PATCH_SIZE = 2               # space-to-depth before the first level: 2 runs it at half resolution
BASE_CHANNELS = 48
CHANNEL_MULTS = (1,)         # one level per entry; downsampling factor PATCH_SIZE * 2 ** (levels - 1): here a
                             # 32x32 latent grid, a code per 2x2 pixels. A 16x16 grid (32 channels, (1, 2):
                             # config/pre_train_grid16.py) lost the sulci: test SSIM 0.958, sharpness 0.30
ENCODER_RES_BLOCKS = 1       # res blocks per encoder level (or a tuple, one count per level)
DECODER_RES_BLOCKS = 1       # res blocks per decoder level (or a tuple)
ATTENTION = False            # self-attention at the lowest level and in the middle (the original: on);
                             # off here: 1.4x the images/s and higher SSIM per CPU-minute at 64x64
LATENT_CHANNELS = 8          # VAE latent channels
NUM_CODES = 1024             # VQVAE codebook size (1024 beat 256 by 0.005 test SSIM here, all in use)
CODE_DIM = 8                 # VQVAE code dimension
DISC_CHANNELS = 32           # PatchGAN base channels
DISC_LAYERS = 2              # PatchGAN stride-2 layers
DISC_ATTENTION = False       # the original's attention block before the PatchGAN's last conv
# optimisation
EPOCHS = 14
BATCH_SIZE = 16              # per process
LR = 5e-4                    # the original used 2e-4 over 25,000 steps; a short CPU run wants more
MIN_LR_RATIO = 0.1           # cosine decay of both learning rates to LR * MIN_LR_RATIO at the last step
BETAS = (0.5, 0.9)
GAN_START_STEP = 960         # GAN terms (and discriminator updates) start after this many steps (epoch 11 here)
GAN_WEIGHT = 0.1             # times the adaptive weight ||grad L_rec|| / ||grad L_gan|| (original: 0.5)
RANDOM_LATENTS = 4           # random latents decoded per step for the auxiliary GAN term (at most the batch; the
                             # original: the batch, 3): 16 made each GAN step 1.3x as long as 4 here
DETAIL_WEIGHT = 2.0          # weight of the detail-energy loss (detail_energy_loss; 0 = off): at 1 it brought a
                             # 64-channel VQVAE's reconstructions from 0.80 to 1.01 of real's sharpness (test SSIM
                             # 0.991 against 0.994). Here 2 against 1: the same reconstruction sharpness (0.95 on
                             # test), SSIM 0.980 against 0.985, and diffusion samples a little closer to real at
                             # every snap temperature on validate (Frechet, tissue, sharpness; README, "Realism")
DETAIL_WINDOW = 8            # its windows, in pixels
KL_WEIGHT = 1e-6             # VAE: the KL weight each annealing cycle ramps towards
KL_CYCLE_STEPS = 500         # VAE: the KL weight ramps from half towards full over each cycle
USE_BF16 = None              # bf16 autocast on the CPU: None = where it has bf16 instructions (AVX-512-BF16 or AMX:
                             # 1.4x the steps/s here), True / False to force;
                             # on an AVX2 CPU bf16 made a step 16x slower. CUDA uses it wherever the GPU has it
CUDA_GRAPHS = True           # on a GPU, one process: replay each training step as one CUDA graph (util.CudaGraphStep),
                             # as eager steps leave the GPU waiting on Python issuing their kernels
SEED = 0
CKPT_DIR = "model_ckpt"
LOG_DIR = "log"
VISUALIZE_DIR = "visualize"

# constants that fix tensor shapes: a checkpoint made with other values cannot be loaded
SHAPE_KEYS = ("MODE", "IMG_SIZE", "Z_CONDITIONING", "PATCH_SIZE", "BASE_CHANNELS", "CHANNEL_MULTS", "ATTENTION",
              "ENCODER_RES_BLOCKS", "DECODER_RES_BLOCKS", "LATENT_CHANNELS", "NUM_CODES",
              "CODE_DIM", "DISC_CHANNELS", "DISC_LAYERS", "DISC_ATTENTION")
NUM_Z = dataset.SLICES_PER_BRAIN
# the types these constants take besides their default's (util.apply_overrides), for this script and for
# anything that loads a preset of it (bench/first_stage_speed.py)
OTHER_TYPES = {"ENCODER_RES_BLOCKS": tuple, "DECODER_RES_BLOCKS": tuple, "USE_BF16": bool}


def kl_weight(step):
    """Cyclical annealing: from KL_WEIGHT / 2 up linearly over each KL_CYCLE_STEPS steps, the
    cycle's last step at KL_WEIGHT * (1 - 1 / (2 KL_CYCLE_STEPS)), then back to half."""
    return KL_WEIGHT * (0.5 + 0.5 * (step % KL_CYCLE_STEPS) / KL_CYCLE_STEPS)


def detail_energy_loss(reconstructions, images):
    """L1 between the local RMS of the reconstructions' and the images' Laplacian, over
    DETAIL_WINDOW-pixel windows: it asks for as much fine detail as the image has in each window,
    not for the detail itself, which the code may not hold (L1 alone then blurs it away)."""
    def local_rms(x):
        return (F.avg_pool2d(realism.laplacian(x) ** 2, DETAIL_WINDOW) + 1e-8).sqrt()   # 1e-8: sqrt's slope at 0
    return F.l1_loss(local_rms(reconstructions), local_rms(images))


def random_latents(model, code_histogram, n, device):
    """Latents to decode for the auxiliary GAN term: N(0, I) for the VAE; for the VQVAE, codes
    drawn per position from the last epoch's code histogram."""
    if isinstance(model, VQVAE):
        return model.quantizer.embed_indices(model.sample_code_indices(code_histogram, n))
    return torch.randn((n,) + model.latent_shape(IMG_SIZE), device=device)


def generator_loss(model, core_model, core_discriminator, images, zs, kl_weight_now, gan_on, code_histogram):
    """The autoencoder's loss and its logged terms: L1 reconstruction plus the VQ commitment loss
    (VQVAE) or kl_weight_now (kl_weight(step), a number or a 0-d tensor) x KL (VAE); with
    `gan_on` (from GAN_START_STEP on), plus GAN_WEIGHT x the adaptive weight x the hinge generator
    terms on the reconstructions and on decodings of random latents, in one call of the unwrapped
    discriminator (so its gradients here are never all-reduced). `model` is `core_model` or its
    DDP wrapper. Returns (total, {name: term}, reconstructions, random-latent decodings or None,
    code indices or None)."""
    reconstruction, regulariser, indices = model(images, zs)
    rec_loss = F.l1_loss(reconstruction.float(), images)
    if isinstance(core_model, VQVAE):
        losses = {"rec_loss": rec_loss, "vq_loss": regulariser}
        total = rec_loss + regulariser
    else:
        losses = {"rec_loss": rec_loss, "kl_loss": regulariser, "kl_weight": kl_weight_now}
        total = rec_loss + kl_weight_now * regulariser
    if DETAIL_WEIGHT:
        losses["detail_loss"] = detail_energy_loss(reconstruction.float(), images)
        total = total + DETAIL_WEIGHT * losses["detail_loss"]
    generated = None
    if gan_on:
        random_zs = zs[:RANDOM_LATENTS]
        generated = core_model.decode(random_latents(core_model, code_histogram, len(random_zs), images.device),
                                      random_zs)
        logits = core_discriminator(torch.cat([reconstruction, generated]), torch.cat([zs, random_zs]))
        g_loss, g_random_loss = (-logits.float()).split(len(images))
        g_loss, g_random_loss = g_loss.mean(), g_random_loss.mean()
        weight = GAN_WEIGHT * adaptive_gan_weight(rec_loss, g_loss, core_model.last_layer_weight)
        total = total + weight * (g_loss + g_random_loss)
        losses.update(g_loss=g_loss, g_random_loss=g_random_loss, adaptive_weight=weight)
    return total, losses, reconstruction, generated, indices


@torch.no_grad()
def save_grids(model, loader, code_histogram, device, epoch):
    """Originals above reconstructions of the first brain of `loader` (32 slices each), and
    32 random samples, z = 0..31, to visualize/."""
    model.eval()
    images, _, _, zs = next(iter(loader))
    images, zs = images[:NUM_Z].to(device), zs[:NUM_Z].to(device)
    reconstruction, _ = model.reconstruct(images, zs)
    util.save_image_grid(torch.cat([images, reconstruction.float()]),
                         os.path.join(VISUALIZE_DIR, f"{run_name}_reconstruction_epoch{epoch:03d}.png"))
    all_z = torch.arange(NUM_Z, device=device)
    samples = model.sample(NUM_Z, all_z, code_histogram if isinstance(model, VQVAE) else IMG_SIZE)
    util.save_image_grid(samples.float(), os.path.join(VISUALIZE_DIR, f"{run_name}_samples_epoch{epoch:03d}.png"))
    model.train()


if __name__ == "__main__":
    config = util.apply_overrides(globals(), other_types=OTHER_TYPES)
    util.check_positive_ints(config, ("EPOCHS", "BATCH_SIZE", "KL_CYCLE_STEPS", "RANDOM_LATENTS", "DETAIL_WINDOW"))
    if not DETAIL_WEIGHT >= 0:
        raise util.UserError(f"DETAIL_WEIGHT must be >= 0 (0 = no detail-energy loss), got {DETAIL_WEIGHT}")
    if TRAIN_SPLIT not in dataset.TRAINING_MODES:
        raise util.UserError(f"TRAIN_SPLIT must be one of {', '.join(dataset.TRAINING_MODES)}, got {TRAIN_SPLIT!r}")
    run_name = RUN_NAME or MODE.lower()
    device = util.setup_distributed()
    world_size, rank = util.world_size_and_rank()
    is_main = rank == 0
    torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
    util.seed_everything(SEED)
    model = build_model(config).to(device)        # checks the shape constants before the data loads
    discriminator = build_discriminator(config).to(device)
    amp_dtype = util.autocast_dtype(device, USE_BF16)     # bf16 needs no loss scaling

    def autocast():
        return util.autocast(device, amp_dtype)

    train_loader = dataset.get_dataloader(TRAIN_SPLIT, BATCH_SIZE, DATA_DIR, IMG_SIZE, seed=SEED)
    validate_loader = dataset.get_dataloader("validate", 32, DATA_DIR, IMG_SIZE)
    graphs = CUDA_GRAPHS and device.type == "cuda" and world_size == 1
    fused = device.type == "cuda"         # one kernel for the whole update instead of one per tensor
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, betas=BETAS, fused=fused)
    disc_optimizer = torch.optim.Adam(discriminator.parameters(), lr=LR, betas=BETAS, fused=fused)
    latent_grid = model.latent_shape(IMG_SIZE)[1:]
    # VQVAE: per-position code counts of the last epoch, uniform until one epoch is seen
    code_histogram = torch.ones(*latent_grid, NUM_CODES, device=device) if MODE == "VQVAE" else None

    last_path = os.path.join(CKPT_DIR, f"{run_name}_last.pt")
    best_path = os.path.join(CKPT_DIR, f"{run_name}_best.pt")
    start_epoch, step, best_val_ssim, train_seconds, train_images = 0, 0, -1.0, 0.0, 0
    checkpoint = util.resume(last_path, config, SHAPE_KEYS, {"model": model, "discriminator": discriminator,
                             "optimizer": optimizer, "disc_optimizer": disc_optimizer}, verbose=is_main)
    if checkpoint:
        code_histogram = checkpoint["code_histogram"]
        code_histogram = None if code_histogram is None else code_histogram.to(device)
        start_epoch, step, best_val_ssim = checkpoint["epoch"], checkpoint["step"], checkpoint["best_val_ssim"]
        train_seconds, train_images = checkpoint["train_seconds"], checkpoint["train_images"]
    for any_optimizer in (optimizer, disc_optimizer):
        util.set_capturable(any_optimizer, graphs)
    log = TrainingLog(os.path.join(LOG_DIR, f"{run_name}.log"), resume_step=step if start_epoch else None) \
        if is_main else None
    if is_main:
        print(f"{MODE} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, discriminator "
              f"{sum(p.numel() for p in discriminator.parameters()) / 1e6:.2f}M, latent grid {latent_grid}, "
              f"{len(train_loader.dataset)} training slices, device {device}"
              f"{' (bf16 autocast)' if amp_dtype else ''}, {world_size} process(es)"
              f"{', steps replayed as CUDA graphs' if graphs else ''}")

    step_values = util.StepValues(log, device, last_path, "Try a lower LR or USE_BF16=False.")
    core_model = model   # methods and the adaptive weight's last layer live on the unwrapped module
    if world_size > 1:
        model = DistributedDataParallel(model)
        discriminator = DistributedDataParallel(discriminator)
    core_discriminator = discriminator.module if world_size > 1 else discriminator

    def training_step(images, zs, kl_weight_now, gan_on):
        """One update of the autoencoder, then of the discriminator once the GAN is on:
        ({name: logged term}, code indices or None)."""
        with autocast(), util.frozen(core_discriminator):
            total, losses, reconstruction, generated, indices = generator_loss(
                model, core_model, core_discriminator, images, zs, kl_weight_now, gan_on, code_histogram)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if gan_on:
            with autocast():
                fakes = torch.cat([reconstruction.detach(), generated.detach()])
                logits = discriminator(torch.cat([images, fakes]), torch.cat([zs, zs, zs[:RANDOM_LATENTS]]))
                d_loss = hinge_discriminator_loss(*logits.float().split(len(images)))
            disc_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_optimizer.step()
            losses["d_loss"] = d_loss
        # detached: a logged term kept past this step would keep its autograd graph alive into the next
        return {name: value.detach() if torch.is_tensor(value) else value for name, value in losses.items()}, indices

    run_step, run_step_gan_on = None, None
    epoch_stats = {}   # last epoch's validation SSIM and codebook usage, shown on the progress bar
    for epoch in range(start_epoch, EPOCHS):
        train_loader.sampler.set_epoch(epoch)
        epoch_counts = torch.zeros(*latent_grid, NUM_CODES, device=device) if MODE == "VQVAE" else None
        epoch_start = time.time()
        progress = tqdm(train_loader, desc=f"epoch {epoch + 1}/{EPOCHS}", disable=not is_main, leave=False)
        for images, _, _, zs in progress:
            images, zs = images.to(device, non_blocking=True), zs.to(device, non_blocking=True)
            gan_on = step >= GAN_START_STEP
            if run_step_gan_on != gan_on:   # the first step, or the GAN's: the GAN phase is another graph
                phase_step = functools.partial(training_step, gan_on=gan_on)
                run_step, run_step_gan_on = util.CudaGraphStep(phase_step) if graphs else phase_step, gan_on
            learning_rate = util.cosine_learning_rate(step, EPOCHS * len(train_loader), LR, MIN_LR_RATIO)
            for any_optimizer in (optimizer, disc_optimizer):
                util.set_learning_rate(any_optimizer, learning_rate)
            losses, indices = run_step(images, zs, torch.full((), kl_weight(step), device=device))
            values = step_values.add(step, losses)
            if indices is not None:
                epoch_counts += code_counts_per_position(indices, NUM_CODES)
            if is_main and values:
                progress.set_postfix({name: f"{values[name]:.4f}" for name in ("rec_loss", "vq_loss", "kl_loss",
                                      "g_loss", "d_loss") if name in values} | epoch_stats)
            step += 1
            train_images += len(images) * world_size
        step_values.flush()
        train_seconds += time.time() - epoch_start

        if MODE == "VQVAE":
            if world_size > 1:
                torch.distributed.all_reduce(epoch_counts)
            code_histogram.copy_(epoch_counts)     # in place: a captured graph reads it where it is
        if is_main:
            val_ssim, _ = evaluate_reconstructions(core_model, validate_loader, device, autocast)
            epoch_stats = {"val_ssim": val_ssim}
            if MODE == "VQVAE":
                usage = codebook_stats(epoch_counts.sum((0, 1)))
                epoch_stats.update(codebook_usage=usage["active_share"],
                                   perplexity_share=usage["perplexity"] / NUM_CODES)
            log.write(step - 1, epoch_stats)   # with the epoch's last step
            epoch_stats = {name: round(value, 4) for name, value in epoch_stats.items()}
            save_grids(core_model, validate_loader, code_histogram, device, epoch + 1)
            improved = val_ssim > best_val_ssim or TRAIN_SPLIT == "train_and_validate"
            best_val_ssim = max(best_val_ssim, val_ssim)
        rng_states = util.rng_states()     # every process calls it: under torchrun it gathers theirs
        if is_main:
            checkpoint = {"config": config, "model": core_model.state_dict(),
                          "discriminator": core_discriminator.state_dict(), "optimizer": optimizer.state_dict(),
                          "disc_optimizer": disc_optimizer.state_dict(), "code_histogram": code_histogram,
                          "epoch": epoch + 1, "step": step, "best_val_ssim": best_val_ssim,
                          "train_seconds": train_seconds, "train_images": train_images, **rng_states}
            util.save_checkpoint(checkpoint, last_path, also=best_path if improved else None)
            print(f"epoch {epoch + 1}/{EPOCHS} step {step}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in epoch_stats.items())
                + f", {len(train_loader) * BATCH_SIZE * world_size / (time.time() - epoch_start):.1f} img/s"
                + (" (best)" if improved else ""))
        if world_size > 1:
            torch.distributed.barrier()
    with util.main_process_alone(is_main):     # the others end here; the main one tests, then ends
        best = util.load_checkpoint(best_path, config, SHAPE_KEYS)
        core_model.load_state_dict(best["model"])
        test_loader = dataset.get_dataloader("test", 32, DATA_DIR, IMG_SIZE)
        test_ssim, test_counts = evaluate_reconstructions(core_model, test_loader, device, autocast)
        summary = {"run": run_name, "mode": MODE, "test_ssim": test_ssim, "best_epoch": best["epoch"],
                   "best_val_ssim": best["best_val_ssim"], "epochs": EPOCHS, "steps": step,
                   "train_images_per_second": train_images / max(train_seconds, 1e-9),
                   "train_seconds": train_seconds,
                   "parameters": sum(p.numel() for p in core_model.parameters()),
                   "device": str(device), "bf16_autocast": amp_dtype is not None, "processes": world_size,
                   "config": config}
        if test_counts is not None:
            usage = codebook_stats(test_counts)
            summary.update(test_codebook_usage=usage["active_share"], test_perplexity=usage["perplexity"])
        util.write_summary(summary, LOG_DIR, run_name)
