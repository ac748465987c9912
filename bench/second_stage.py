"""Second stage on the demo brains: quality from the runs `make` leaves behind (nats per code,
diffusion loss, predict.py's realism table), and sampling speed measured here (transformer
prior with and without its KV cache; DDIM-50, DDPM respaced to RESPACED_STEPS (as predict.py on the CPU) and the full DDPM-1000
of the latent diffusion), and how far the diffusion's sampled latents lie from the codebook
before they are snapped (VQVAE.off_codebook_share, next to real validate latents').

    make                                   # trains everything (or: the scripts one by one)
    .venv/bin/python bench/second_stage.py

The prior's baseline is each position's train-split code histogram with the pseudo-count of
train_viT.HISTOGRAM_PSEUDO_COUNTS that scores best on validate, scored on test. The prior
without its cache runs a forward pass over the codes drawn so far for each new code (the
original's way). Every sampler runs once untimed (warm-up) right before its timed run.
"""
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import realism  # noqa: E402
import util  # noqa: E402
from latent_dataset import load_latents  # noqa: E402
from model_diffusion import load_diffusion, unnormalise  # noqa: E402
from model_prior import load_prior  # noqa: E402
from model_VAE import load_first_stage  # noqa: E402
from train_viT import histogram_baseline, histogram_nats_per_code  # noqa: E402

# ----------------------------------------------------------------------------- config
FIRST_STAGE = "vqvae"        # a VQVAE run whose prior, diffusion and predict.py have run
RESPACED_STEPS = 100         # the respaced DDPM's steps: predict.DDPM_STEPS, the CPU's
DIFFUSION_RUN = ""           # "" = <FIRST_STAGE>_diffusion; or another stable_diffusion.py run on that first stage
SAMPLES = 16
THREADS = 2
SEED = 0                     # the diffusion's draws, so that its off-codebook figures repeat


def read_json(name):
    path = os.path.join(ROOT, "log", name)
    if not os.path.isfile(path):
        raise SystemExit(f"{path} does not exist: run `make` (or pre_train.py, latent_dataset.py, train_viT.py, "
                         f"stable_diffusion.py and predict.py) first")
    with open(path) as f:
        return json.load(f)


def warm_then_time(function):
    """(seconds of one call of `function` after one untimed call, what that call returned)."""
    function()
    start = time.time()
    result = function()
    return time.time() - start, result


if __name__ == "__main__":
    util.apply_overrides(globals())
    torch.set_num_threads(THREADS)
    diffusion_run = DIFFUSION_RUN or f"{FIRST_STAGE}_diffusion"
    prior_summary = read_json(f"{FIRST_STAGE}_prior_summary.json")
    diffusion_summary = read_json(f"{diffusion_run}_summary.json")
    realism_results = read_json(f"{FIRST_STAGE}_realism.json")
    latents = {split: load_latents(os.path.join(ROOT, "collected_latents"), FIRST_STAGE, split)
               for split in ("train", "validate", "test")}
    codes = {split: data["indices"] for split, data in latents.items()}
    num_codes = latents["train"]["config"]["NUM_CODES"]
    histogram, pseudo_count = histogram_baseline(codes["train"], codes["validate"], codes["test"], num_codes)
    add_one = histogram_nats_per_code(codes["train"], codes["test"], num_codes, 1.0)
    print("transformer prior, test split (nats per code; lower is better)")
    print(f"  prior {prior_summary['test_nats_per_code']:.3f}   per-position histogram {histogram:.3f} "
          f"(pseudo-count {pseudo_count:g}, chosen on validate; add-one: {add_one:.3f})   "
          f"uniform {prior_summary['uniform_nats_per_code']:.3f}"
          f"   ({prior_summary['parameters'] / 1e6:.2f}M params, {prior_summary['train_seconds']:.0f} s training)")
    print(f"latent diffusion ({diffusion_run}): test loss {diffusion_summary['test_loss']:.4f} "
          f"({diffusion_summary['parameters'] / 1e6:.2f}M params, {diffusion_summary['train_seconds']:.0f} s training)")
    print(f"realism (predict.py, {realism_results['volumes_per_sampler']} volumes per sampler):")
    print(realism.format_table(realism_results))

    prior, checkpoint = load_prior(os.path.join(ROOT, "model_ckpt", f"{FIRST_STAGE}_prior_best.pt"), "cpu")
    z = torch.arange(SAMPLES) % 32
    cached, _ = warm_then_time(lambda: prior.sample(z))
    uncached, _ = warm_then_time(lambda: prior.sample(z, use_cache=False))
    guidance = max(checkpoint["config"]["GUIDANCE_SCALES"])    # any scale but 1 doubles the batch: the search's largest
    guided, _ = warm_then_time(lambda: prior.sample(z, guidance=guidance))
    print(f"prior sampling, {SAMPLES} slices x {prior.sequence_length * prior.codes_per_patch} codes: "
          f"KV cache {cached:.2f} s, forward pass over the drawn prefix per code {uncached:.2f} s "
          f"({uncached / cached:.1f}x); KV cache at guidance {guidance:g} {guided:.2f} s "
          f"(chosen on validate: {checkpoint['sampling']['guidance']:g})")

    unet, diffusion, checkpoint = load_diffusion(os.path.join(ROOT, "model_ckpt", f"{diffusion_run}_best.pt"), "cpu")
    stats = checkpoint["stats"]
    shape = (SAMPLES,) + tuple(stats["latent_shape"])
    guidance = checkpoint["sampling"]["guidance"]      # chosen on validate; any scale but 1 doubles the batch
    torch.manual_seed(SEED)
    ddim, ddim_latents = warm_then_time(lambda: diffusion.sample_ddim(unet, shape, z, 50, x0_bound=stats["x0_bound"],
                                                                      guidance=guidance))
    respaced, (ddpm_latents, _) = warm_then_time(lambda: diffusion.sample_ddpm(
        unet, shape, z, x0_bound=stats["x0_bound"], steps=RESPACED_STEPS, guidance=guidance))
    ddpm, _ = warm_then_time(lambda: diffusion.sample_ddpm(unet, shape, z, x0_bound=stats["x0_bound"],
                                                           guidance=guidance))
    print(f"diffusion sampling, {SAMPLES} latents {shape[1:]}, guidance {guidance:g}: DDIM-50 {ddim:.2f} s, "
          f"DDPM-{RESPACED_STEPS} {respaced:.2f} s, DDPM-1000 {ddpm:.2f} s ({ddpm / ddim:.1f}x DDIM-50)")

    first_stage, _ = load_first_stage(latents["validate"]["checkpoint"], "cpu")
    real_share, ddim_share, ddpm_share = (first_stage.off_codebook_share(values) for values in (
        latents["validate"]["latents"], unnormalise(ddim_latents, stats), unnormalise(ddpm_latents, stats)))
    print(f"off the codebook (share of the latents' variance; snapping removes it): real validate latents "
          f"{real_share:.1%}, DDIM-50 samples {ddim_share:.1%}, DDPM-{RESPACED_STEPS} samples {ddpm_share:.1%}")
