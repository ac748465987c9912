"""Second stage (VQVAE): a transformer prior over the code grid, conditioned on the slice index z.

    python latent_dataset.py && python train_viT.py      # after pre_train.py --MODE=VQVAE
    torchrun --nproc_per_node=2 train_viT.py             # DistributedDataParallel, same script

A decoder-only (GPT) transformer reads a slice's codes in raster order. Position 0 holds a
start token made from z, so the logits at position i predict code i from z and codes 0..i-1
(the original predicted code i from codes 0..i, learned to copy its input, and sampled noise).
Training minimises cross-entropy on collected_latents/<FIRST_STAGE>_train.pt; each epoch logs,
scores the validate split (nats per code) and saves model_ckpt/<run>_{last,best}.pt; every
GRID_EVERY epochs a grid of 32 sampled slices (z = 0..31) decoded by the first stage goes to
visualize/. Re-running resumes.
A share Z_DROP of the training slices is told no z, so that sampling can use classifier-free
guidance on z. At the end the best epoch's sampling temperature, top-p and guidance scale are
chosen on validate by the realism metrics (stored in its checkpoint for predict.py); it is scored
once on the test split, next to the per-position code histogram the first stage samples from
(smoothed with the pseudo-count that scores best on validate), and log/<run>_summary.json is written.
"""
import itertools
import math
import os
import time

import torch
from einops import rearrange
from torch.nn.parallel import DistributedDataParallel

import realism
import util
from latent_dataset import check_same_first_stage, load_latents
from logger import TrainingLog
from model_prior import SAMPLING_KEYS, CodePrior, prior_args, sample_volumes
from model_VAE import load_first_stage
from module import code_counts_per_position, hide_z

# ----------------------------------------------------------------------------- config (CPU preset)
FIRST_STAGE = "vqvae"        # run name of the VQVAE whose codes are modelled
RUN_NAME = ""                # "" = "<FIRST_STAGE>_prior"
N_LAYER = 4
N_HEAD = 4
N_EMBD = 128                 # the original: 2 layers, width 32, 2 heads
PATCH_SIZE = 2               # codes read p x p at a time: each transformer position predicts a patch, code by code
                             # (2 on the 32x32 grid: 256 positions instead of 1,024; the GPU preset's 16x16: 1)
DROPOUT = 0.0                # 0.1 made a step 1.25x as slow here; the prior gained more from the steps it bought
Z_DROP = 0.1                 # share of training slices told no z (module.NULL_Z): the unconditional
                             # branch that classifier-free guidance needs
EPOCHS = 8                   # ~42 s each here; validate 2.51 nats/code at epoch 8, 2.52 at 10 (of 10)
BATCH_SIZE = 8               # per process; as fast per slice as 32 on the CPU, with 4x the steps an epoch
                             # (validate after 8 epochs: 2.51 nats/code; batch 16: 2.55, 32 with dropout: 2.69)
LR = 2e-3                    # batch 32, validate after 6 epochs: 2.81 nats/code (1e-3: 3.00, 4e-3: 2.81)
MIN_LR_RATIO = 0.1           # cosine decay to LR * MIN_LR_RATIO at the last step
WEIGHT_DECAY = 0.1
TEMPERATURES = (1.0,)        # sampling: softmax temperatures tried (0.9 never won on the 32x32 grid) ...
TOP_PS = (1.0, 0.98, 0.95)   # ... with nucleus sampling: at each step the likeliest codes holding this much
                             # probability (1 = all; model_prior.keep_nucleus) ...
GUIDANCE_SCALES = (1.0, 2.0)  # ... and guidance scales (1 = plain conditional; 3 broke volumes apart, identity
                             # correlation 0.08-0.16 on validate, and left the search); after training the
                             # setting whose samples score best on validate (realism.choose_setting, brain
                             # critic needed) goes into the best checkpoint for predict.py; one setting: no search
SWEEP_VOLUMES = 4            # volumes sampled per setting for that choice
GRID_EVERY = 3               # epochs between sample grids (32 slices, ~4 s here), and one of the best at the end
HISTOGRAM_PSEUDO_COUNTS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)   # the histogram baseline's smoothing,
                             # the one best on validate (add-one overstated the prior's lead by ~20%)
USE_BF16 = None              # bf16 autocast for the training steps on the CPU: None = where it has bf16 instructions
                             # (AVX-512-BF16 or AMX; a step 1.25x as fast here), True / False to force. A GPU trains in fp32:
                             # at these sizes its steps wait on kernel launches, which autocast's casts add to
CUDA_GRAPHS = False          # on a GPU, one process: replay each training step as one CUDA graph (util.CudaGraphStep),
                             # as pre_train.py does; off until it has been measured on a GPU
SEED = 0
CKPT_DIR = "model_ckpt"
LATENT_DIR = "collected_latents"
LOG_DIR = "log"
VISUALIZE_DIR = "visualize"

SHAPE_KEYS = ("FIRST_STAGE", "N_LAYER", "N_HEAD", "N_EMBD", "PATCH_SIZE")


def histogram_nats_per_code(train_codes, codes, num_codes, pseudo_count):
    """Cross-entropy of `codes` under each position's train-split code histogram plus
    `pseudo_count` per code: the distribution the first stage's random sampler draws from,
    smoothed so that a code unseen at a position is not impossible."""
    counts = rearrange(code_counts_per_position(train_codes, num_codes), "h w k -> (h w) k").float() + pseudo_count
    log_probs = (counts / counts.sum(1, keepdim=True)).log()
    flat = rearrange(codes, "n h w -> n (h w)")
    return -log_probs.gather(1, flat.T).mean().item()


def histogram_baseline(train_codes, validate_codes, test_codes, num_codes):
    """The per-position histogram at its best: (nats per code of test_codes, the pseudo-count
    of HISTOGRAM_PSEUDO_COUNTS that scores best on validate_codes)."""
    pseudo_count = min(HISTOGRAM_PSEUDO_COUNTS,
                       key=lambda count: histogram_nats_per_code(train_codes, validate_codes, num_codes, count))
    return histogram_nats_per_code(train_codes, test_codes, num_codes, pseudo_count), pseudo_count


@torch.no_grad()
def evaluate(prior, loader, device):
    """Mean nats per code over a loader of (codes, z)."""
    prior.eval()
    total, count = 0.0, 0
    for codes, z in loader:
        total += prior(codes.to(device), z.to(device), return_nats_per_code=True).item() * len(codes)
        count += len(codes)
    prior.train()
    return total / count


def choose_sampling(prior, first_stage, first_stage_config, device):
    """The {"temperature", "top_p", "guidance"} of TEMPERATURES x TOP_PS x GUIDANCE_SCALES whose
    samples score best on the validate brains (realism.choose_on_validate), and the scored rows."""
    settings = [dict(zip(SAMPLING_KEYS, values))
                for values in itertools.product(TEMPERATURES, TOP_PS, GUIDANCE_SCALES)]
    return realism.choose_on_validate(lambda setting: sample_volumes(prior, first_stage, device, SWEEP_VOLUMES, **setting),
                                      settings, first_stage_config, CKPT_DIR, device, SEED)


if __name__ == "__main__":
    config = util.apply_overrides(globals(), other_types={"USE_BF16": bool})
    util.check_positive_ints(config, ("EPOCHS", "BATCH_SIZE", "GRID_EVERY"))
    run_name = RUN_NAME or f"{FIRST_STAGE}_prior"
    device = util.setup_distributed()
    amp_dtype = util.autocast_dtype(device, USE_BF16, bf16_on_cuda=False)      # fp32 on CUDA: see USE_BF16
    world_size, rank = util.world_size_and_rank()
    is_main = rank == 0
    torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
    util.seed_everything(SEED)

    train, validate = (load_latents(LATENT_DIR, FIRST_STAGE, split) for split in ("train", "validate"))
    if train["indices"] is None:
        raise util.UserError(f"{LATENT_DIR}/{FIRST_STAGE}_train.pt holds VAE latents; the transformer prior "
                             f"models VQ codes: set FIRST_STAGE to a VQVAE run")
    model_args = prior_args(config, train["config"]["NUM_CODES"], train["indices"].shape[1:])
    first_stage, _ = load_first_stage(train["checkpoint"], device)
    train_loader = util.make_loader(torch.utils.data.TensorDataset(train["indices"], train["z"]), BATCH_SIZE,
                                    shuffle=True, seed=SEED, drop_last=True)
    validate_loader = util.make_loader(torch.utils.data.TensorDataset(validate["indices"], validate["z"]), 64,
                                       shuffle=False)
    prior = CodePrior(**model_args).to(device)
    optimizer = torch.optim.AdamW(prior.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY,
                                  fused=device.type == "cuda")

    last_path = os.path.join(CKPT_DIR, f"{run_name}_last.pt")
    best_path = os.path.join(CKPT_DIR, f"{run_name}_best.pt")
    start_epoch, step, best_val_loss, train_seconds = 0, 0, math.inf, 0.0
    checkpoint = util.resume(last_path, config, SHAPE_KEYS, {"model": prior, "optimizer": optimizer}, verbose=is_main)
    if checkpoint:
        check_same_first_stage(checkpoint, train, last_path)
        start_epoch, step, best_val_loss = checkpoint["epoch"], checkpoint["step"], checkpoint["best_val_loss"]
        train_seconds = checkpoint["train_seconds"]
    log = TrainingLog(os.path.join(LOG_DIR, f"{run_name}.log"), resume_step=step if start_epoch else None) \
        if is_main else None
    if is_main:
        print(f"prior {sum(p.numel() for p in prior.parameters()) / 1e6:.2f}M params, "
              f"{prior.sequence_length * prior.codes_per_patch} codes per slice from {model_args['num_codes']} in "
              f"{prior.sequence_length} positions, {len(train['z'])} training slices, device {device}")
    model = DistributedDataParallel(prior) if world_size > 1 else prior

    step_values = util.StepValues(log, device, last_path, "Try a lower LR.")

    def training_step(codes, z):
        with util.autocast(device, amp_dtype):
            loss = model(codes, hide_z(z, Z_DROP), return_nats_per_code=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        optimizer.step()
        return {"train_loss": loss.detach()}

    run_step = util.training_step_runner(training_step, [optimizer],
                                         CUDA_GRAPHS and device.type == "cuda" and world_size == 1)
    for epoch in range(start_epoch, EPOCHS):
        step, epoch_seconds = util.train_epoch(train_loader, epoch, EPOCHS, run_step, optimizer, step, step_values,
                                               device, LR, MIN_LR_RATIO, show_progress=is_main)
        train_seconds += epoch_seconds

        if is_main:
            val_loss = evaluate(prior, validate_loader, device)
            log.write(step - 1, {"val_loss": val_loss})
            if (epoch + 1) % GRID_EVERY == 0:
                prior.eval()
                util.save_image_grid(sample_volumes(prior, first_stage, device),
                                     os.path.join(VISUALIZE_DIR, f"{run_name}_samples_epoch{epoch + 1:03d}.png"))
                prior.train()
            improved = val_loss < best_val_loss
            best_val_loss = min(best_val_loss, val_loss)
        rng_states = util.rng_states()     # every process calls it: under torchrun it gathers theirs
        if is_main:
            checkpoint = {"config": config, "model_args": model_args, "model": prior.state_dict(),
                          "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "step": step,
                          "best_val_loss": best_val_loss, "train_seconds": train_seconds,
                          "first_stage_weights": train.get("first_stage_weights"), **rng_states}
            util.save_checkpoint(checkpoint, last_path, also=best_path if improved else None)
            print(f"epoch {epoch + 1}/{EPOCHS} step {step}: val {val_loss:.4f} nats/code, "
                  f"{len(train_loader) * BATCH_SIZE * world_size / epoch_seconds:.1f} slices/s"
                  + (" (best)" if improved else ""))
        if world_size > 1:
            torch.distributed.barrier()
    with util.main_process_alone(is_main):     # the others end here; the main one tests and samples
        best = util.load_checkpoint(best_path, config, SHAPE_KEYS)
        prior.load_state_dict(best["model"])
        prior.eval()
        search_start = time.time()
        sampling, search = choose_sampling(prior, first_stage, train["config"], device)
        best["sampling"] = sampling        # what predict.py samples with
        util.save_checkpoint(best, best_path)
        print(f"sampling chosen on validate: temperature {sampling['temperature']}, top-p {sampling['top_p']}, "
              f"guidance {sampling['guidance']} "
              f"({len(search)} pairs scored in {time.time() - search_start:.0f} s)")
        test = load_latents(LATENT_DIR, FIRST_STAGE, "test")
        test_loader = util.make_loader(torch.utils.data.TensorDataset(test["indices"], test["z"]), 64, shuffle=False)
        sample_start = time.time()
        util.save_image_grid(sample_volumes(prior, first_stage, device, **sampling),
                             os.path.join(VISUALIZE_DIR, f"{run_name}_samples_best.png"))
        sample_seconds = time.time() - sample_start
        histogram_nats, pseudo_count = histogram_baseline(train["indices"], validate["indices"], test["indices"],
                                                          model_args["num_codes"])
        summary = {"run": run_name, "first_stage": FIRST_STAGE, "best_epoch": best["epoch"],
                   "test_nats_per_code": evaluate(prior, test_loader, device),
                   "test_nats_per_code_histogram": histogram_nats, "histogram_pseudo_count": pseudo_count,
                   "uniform_nats_per_code": math.log(model_args["num_codes"]),
                   "sample_seconds_32_slices": sample_seconds, "sampling": sampling,
                   "sampling_search": search,
                   "train_seconds": train_seconds, "parameters": sum(p.numel() for p in prior.parameters()),
                   "device": str(device), "bf16_autocast": amp_dtype is not None, "processes": world_size,
                   "config": config}
        util.write_summary(summary, LOG_DIR, run_name)
