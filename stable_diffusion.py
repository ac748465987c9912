"""Second stage: a latent DDPM ("stable diffusion") U-Net conditioned on the slice index z.

    python latent_dataset.py && python stable_diffusion.py          # on the VQVAE's latents
    python latent_dataset.py --FIRST_STAGE=vae && python stable_diffusion.py --FIRST_STAGE=vae
    torchrun --nproc_per_node=2 stable_diffusion.py                 # DistributedDataParallel

The U-Net learns to predict v (or the noise, PREDICTION) from noised first-stage latents
(collected_latents/<FIRST_STAGE>_train.pt: the VQVAE's pre-quantisation latents, or the VAE's
posterior means),
standardised per channel with the train split's mean and std (the original min-max scaled per z
and per element, which 48 brains cannot estimate). An exponential moving average of the weights
is what gets evaluated and sampled. Every EVAL_EVERY epochs: log, validate-split loss at fixed
timesteps and noise, model_ckpt/<run>_{last,best}.pt; every GRID_EVERY epochs a grid of one
sampled volume (z = 0..31 sharing one noise trajectory, DDIM) decoded by the first stage (VQVAE:
each vector snapped to its nearest code first). Re-running resumes. At the end: the guidance
scale and (VQVAE) the snap temperature are chosen on validate, test loss once,
log/<run>_summary.json.
"""
import copy
import functools
import math
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel

import realism
import util
from latent_dataset import check_same_first_stage, load_latents
from logger import TrainingLog
from model_diffusion import (LatentUNet, build_diffusion, decode_latents, diffusion_latents, sample_latents,
                             sample_volumes, unet_args)
from model_VAE import VQVAE, load_first_stage

# ----------------------------------------------------------------------------- config (CPU preset)
FIRST_STAGE = "vqvae"        # run name of the first stage whose latents are modelled
RUN_NAME = ""                # "" = "<FIRST_STAGE>_diffusion"
BASE_CHANNELS = 32           # the original: 32 / 64 channels, attention, ~0.7M params
CHANNEL_MULTS = (1, 2)
PATCH_SIZE = 2               # latents folded p x p into channels before the first level: the 32x32 grid at a
                             # 16x16 grid's cost (~5 s an epoch here; unfolded, ~14 s). The GPU preset's 16x16: 1
HEAD_CHANNELS = 16           # PATCH_SIZE > 1: a res block of this width at the latents' own resolution
                             # (model_diffusion.FullResolutionHead; 0 = none): on the 32x32 grid test loss
                             # 0.364 against 0.449 in 176 s of training against 162 s, samples a third as far
                             # off the codebook
RES_BLOCKS = 0               # res blocks per level (the up path has one more, for the skips). 0: a step and a
                             # sample take half the time of 1's; its 80 epochs draw ventricles, which 1's 30 did not
                             # (README: "Enough steps to draw a brain"); the GPU preset: 2
ATTENTION = True             # self-attention at the lowest level and in the middle
Z_CONDITIONING = True        # embed the slice index z into every res block
Z_DROP = 0.1                 # share of training latents told no z (module.NULL_Z): the unconditional
                             # branch that classifier-free guidance needs
GUIDANCE_SCALES = (1.0, 2.0, 3.0)   # guidance scales tried after training (1 = plain conditional) ...
SNAP_TEMPERATURES = (0.0, 1.0, 2.0, 3.0)   # ... each with these snap temperatures (VQVAE: each sampled vector
                             # to its nearest code, 0, or to one drawn by proximity, VQVAE.snap: latents that land
                             # between codes decode smoother than real from their nearest codes; the 80-epoch
                             # U-Net's lie near enough to codes that the search takes 0); the pair whose DDIM samples
                             # score best on validate (realism.choose_setting, brain critic needed) goes into the
                             # best checkpoint for predict.py; one pair: no search
SWEEP_VOLUMES = 4            # volumes sampled per scale for that choice (decoded once per temperature)
NUM_TIMESTEPS = 1000
BETA_START = 1e-4            # linear beta schedule, as the original
BETA_END = 0.02
PREDICTION = "v"             # what the U-Net predicts: "v" (stable near t = T), or "eps", the noise (the original)
LOSS = "mse"                 # "mse" (DDPM), or "l1" (the original)
EPOCHS = 80                  # ~3 s each here
BATCH_SIZE = 32              # per process
LR = 2e-3                    # the original: Adam 1e-3 (with 30 epochs 2e-3 drew closer to real too)
MIN_LR_RATIO = 0.1           # cosine decay to LR * MIN_LR_RATIO at the last step
EMA_DECAY = 0.995            # weight EMA, per step
SAMPLE_STEPS = 50            # DDIM steps for the sample grids (predict.py also runs the DDPM)
GRID_EVERY = 20              # epochs between sample grids (a 32-slice volume, ~1 s here), and one of the best at the end
EVAL_EVERY = 1               # epochs between validation + checkpoint (and after the last): on a GPU an epoch of the
                             # demo latents takes ~1 s and a checkpoint write ~0.4 s, so the GPU preset takes 5
USE_BF16 = None              # bf16 autocast for the training steps on the CPU: None = where it has bf16 instructions
                             # (AVX-512-BF16 or AMX; a step 1.3-1.45x as fast here), True / False to force. A GPU trains in fp32:
                             # at these sizes its steps wait on kernel launches, which autocast's casts add to
CUDA_GRAPHS = False          # on a GPU, one process: replay each training step as one CUDA graph (util.CudaGraphStep),
                             # as pre_train.py does; off until it has been measured on a GPU
SEED = 0
CKPT_DIR = "model_ckpt"
LATENT_DIR = "collected_latents"
LOG_DIR = "log"
VISUALIZE_DIR = "visualize"

# constants that fix tensor shapes or what the output means: a checkpoint made with others is refused
SHAPE_KEYS = ("FIRST_STAGE", "BASE_CHANNELS", "CHANNEL_MULTS", "PATCH_SIZE", "HEAD_CHANNELS", "RES_BLOCKS",
              "ATTENTION", "Z_CONDITIONING", "NUM_TIMESTEPS", "BETA_START", "BETA_END", "PREDICTION")


@torch.no_grad()
def evaluate(model, diffusion, latents, z, device, seed):
    """Mean diffusion loss over (normalised) latents, with timesteps and noise fixed by `seed`
    so that epochs compare. `model` is the EMA U-Net, which stays in eval mode."""
    generator = torch.Generator(device).manual_seed(seed)
    total = 0.0
    for start in range(0, len(latents), 64):
        batch = latents[start:start + 64].to(device)
        total += diffusion.loss(model, batch, z[start:start + 64].to(device), LOSS, generator).item() * len(batch)
    return total / len(latents)


def choose_sampling(model, diffusion, first_stage, first_stage_config, stats, device):
    """The guidance scale of GUIDANCE_SCALES and (VQVAE) snap temperature of SNAP_TEMPERATURES
    whose DDIM samples score best on the validate brains (realism.choose_on_validate):
    ({"guidance", "snap_temperature"}, the scored rows). Each scale's latents are sampled once and
    decoded at every temperature; every scale starts from the same noise (common random numbers)."""
    temperatures = SNAP_TEMPERATURES if isinstance(first_stage, VQVAE) else (0.0,)
    latents_at = functools.lru_cache(maxsize=1)(
        lambda scale: sample_latents(model, diffusion, stats, device, SWEEP_VOLUMES, SAMPLE_STEPS, scale))

    def sample(setting):
        latents, z = latents_at(setting["guidance"])
        return decode_latents(first_stage, latents, stats, z, setting["snap_temperature"],
                              noise_groups=SWEEP_VOLUMES)

    settings = [{"guidance": scale, "snap_temperature": temperature}
                for scale in GUIDANCE_SCALES for temperature in temperatures]
    return realism.choose_on_validate(sample, settings, first_stage_config, CKPT_DIR, device, SEED)


if __name__ == "__main__":
    config = util.apply_overrides(globals(), other_types={"USE_BF16": bool})
    util.check_positive_ints(config, ("EPOCHS", "BATCH_SIZE", "SAMPLE_STEPS", "GRID_EVERY", "EVAL_EVERY"))
    if LOSS not in ("mse", "l1"):
        raise util.UserError(f"LOSS must be 'mse' or 'l1', got {LOSS!r}")
    if not 0 <= EMA_DECAY < 1:
        raise util.UserError(f"EMA_DECAY must be in [0, 1), got {EMA_DECAY}")
    util.check_guidance(config)
    if not SNAP_TEMPERATURES or min(SNAP_TEMPERATURES) < 0:
        raise util.UserError(f"SNAP_TEMPERATURES must hold temperatures >= 0 (0 = nearest code), got "
                             f"{SNAP_TEMPERATURES}")
    run_name = RUN_NAME or f"{FIRST_STAGE}_diffusion"
    device = util.setup_distributed()
    amp_dtype = util.autocast_dtype(device, USE_BF16, bf16_on_cuda=False)      # fp32 on CUDA: see USE_BF16
    world_size, rank = util.world_size_and_rank()
    is_main = rank == 0
    torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
    util.seed_everything(SEED)

    train, validate = (load_latents(LATENT_DIR, FIRST_STAGE, split) for split in ("train", "validate"))
    train_latents = diffusion_latents(train)
    # per-channel standardisation, from the train split alone; sampled x_0 is clipped to its range
    latent_mean = train_latents.mean((0, 2, 3))[:, None, None]
    latent_std = train_latents.std((0, 2, 3))[:, None, None]

    def normalise(latents):
        return (latents - latent_mean) / latent_std

    stats = {"latent_shape": tuple(train_latents.shape[1:]), "latent_mean": latent_mean, "latent_std": latent_std,
             "x0_bound": normalise(train_latents).abs().max().item()}

    model_args = unet_args(config, stats["latent_shape"])
    diffusion = build_diffusion(config).to(device)
    first_stage, _ = load_first_stage(train["checkpoint"], device)
    unet = LatentUNet(**model_args).to(device)
    ema_unet = copy.deepcopy(unet).requires_grad_(False).eval()   # only evaluated and sampled
    optimizer = torch.optim.Adam(unet.parameters(), lr=LR, fused=device.type == "cuda")
    train_loader = util.make_loader(torch.utils.data.TensorDataset(normalise(train_latents), train["z"]),
                                    BATCH_SIZE, shuffle=True, seed=SEED, drop_last=True)
    validate_latents = normalise(diffusion_latents(validate))

    last_path = os.path.join(CKPT_DIR, f"{run_name}_last.pt")
    best_path = os.path.join(CKPT_DIR, f"{run_name}_best.pt")
    start_epoch, step, best_val_loss, train_seconds = 0, 0, math.inf, 0.0
    checkpoint = util.resume(last_path, config, SHAPE_KEYS,
                             {"model": unet, "ema_model": ema_unet, "optimizer": optimizer}, verbose=is_main)
    if checkpoint:
        check_same_first_stage(checkpoint, train, last_path)
        start_epoch, step, best_val_loss = checkpoint["epoch"], checkpoint["step"], checkpoint["best_val_loss"]
        train_seconds = checkpoint["train_seconds"]
    log = TrainingLog(os.path.join(LOG_DIR, f"{run_name}.log"), resume_step=step if start_epoch else None) \
        if is_main else None
    if is_main:
        print(f"U-Net {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params on latents "
              f"{tuple(train_latents.shape[1:])}, {len(train_latents)} training slices, device {device}")
    model = DistributedDataParallel(unet) if world_size > 1 else unet

    step_values = util.StepValues(log, device, last_path, "Try a lower LR.")
    ema_params, unet_params = list(ema_unet.parameters()), list(unet.parameters())

    def training_step(latents, z):
        with util.autocast(device, amp_dtype):
            loss = diffusion.loss(model, latents, z, LOSS, z_drop=Z_DROP)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():   # one fused update of all EMA weights
            torch._foreach_lerp_(ema_params, unet_params, 1 - EMA_DECAY)
        return {"train_loss": loss.detach()}

    run_step = util.training_step_runner(training_step, [optimizer],
                                         CUDA_GRAPHS and device.type == "cuda" and world_size == 1)
    span_start, span_latents = time.time(), 0     # throughput over the epochs since the last validation
    for epoch in range(start_epoch, EPOCHS):
        step, epoch_seconds = util.train_epoch(train_loader, epoch, EPOCHS, run_step, optimizer, step, step_values,
                                               device, LR, MIN_LR_RATIO, show_progress=is_main)
        train_seconds += epoch_seconds
        span_latents += len(train_loader) * BATCH_SIZE * world_size

        if is_main and (epoch + 1) % GRID_EVERY == 0:
            images = sample_volumes(ema_unet, diffusion, first_stage, stats, device, steps=SAMPLE_STEPS)
            util.save_image_grid(images, os.path.join(VISUALIZE_DIR, f"{run_name}_samples_epoch{epoch + 1:03d}.png"))
        saving = (epoch + 1) % EVAL_EVERY == 0 or epoch + 1 == EPOCHS
        if is_main and saving:
            val_loss = evaluate(ema_unet, diffusion, validate_latents, validate["z"], device, SEED)
            log.write(step - 1, {"val_loss": val_loss})
            improved = val_loss < best_val_loss
            best_val_loss = min(best_val_loss, val_loss)
        if saving:
            rng_states = util.rng_states()     # every process calls it: under torchrun it gathers theirs
        if is_main and saving:
            checkpoint = {"config": config, "model_args": model_args, "model": unet.state_dict(),
                          "ema_model": ema_unet.state_dict(), "optimizer": optimizer.state_dict(),
                          "stats": stats,
                          "epoch": epoch + 1, "step": step, "best_val_loss": best_val_loss,
                          "train_seconds": train_seconds, "first_stage_weights": train.get("first_stage_weights"),
                          **rng_states}
            util.save_checkpoint(checkpoint, last_path, also=best_path if improved else None)
            print(f"epoch {epoch + 1}/{EPOCHS} step {step}: val loss {val_loss:.4f}, "
                  f"{span_latents / (time.time() - span_start):.1f} latents/s" + (" (best)" if improved else ""))
            span_start, span_latents = time.time(), 0
        if world_size > 1:
            torch.distributed.barrier()
    with util.main_process_alone(is_main):     # the others end here; the main one tests and samples
        best = util.load_checkpoint(best_path, config, SHAPE_KEYS)
        ema_unet.load_state_dict(best["ema_model"])
        search_start = time.time()
        sampling, search = choose_sampling(ema_unet, diffusion, first_stage, train["config"], stats, device)
        best["sampling"] = sampling        # what predict.py samples with
        util.save_checkpoint(best, best_path)
        print(f"chosen on validate: guidance scale {sampling['guidance']}, snap temperature "
              f"{sampling['snap_temperature']} ({len(search)} settings scored in {time.time() - search_start:.0f} s)")
        test = load_latents(LATENT_DIR, FIRST_STAGE, "test")
        sample_start = time.time()
        images = sample_volumes(ema_unet, diffusion, first_stage, stats, device, steps=SAMPLE_STEPS, **sampling)
        sample_seconds = time.time() - sample_start
        util.save_image_grid(images, os.path.join(VISUALIZE_DIR, f"{run_name}_samples_best.png"))
        summary = {"run": run_name, "first_stage": FIRST_STAGE, "best_epoch": best["epoch"],
                   "best_val_loss": best["best_val_loss"],
                   "test_loss": evaluate(ema_unet, diffusion, normalise(diffusion_latents(test)), test["z"], device,
                                         SEED),
                   f"sample_seconds_32_slices_ddim{SAMPLE_STEPS}": sample_seconds,
                   "sampling": sampling, "sampling_search": search,
                   "train_seconds": train_seconds, "parameters": sum(p.numel() for p in unet.parameters()),
                   "device": str(device), "bf16_autocast": amp_dtype is not None, "processes": world_size,
                   "config": config}
        util.write_summary(summary, LOG_DIR, run_name)
