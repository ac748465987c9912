"""Evaluate and picture a trained pipeline: first-stage test SSIM and codebook usage, random
generation from every sampler there is, realism metrics for all of them, a GIF of the
denoising, and a t-SNE of the latents.

    python predict.py                        # the VQVAE pipeline: pre_train, latent_dataset, train_critic,
                                             # train_viT, stable_diffusion
    python predict.py --FIRST_STAGE=vae      # the VAE pipeline (no prior: it has no codes)

Samplers: the first stage's own (VAE: N(0, I); VQVAE: per-position code histogram), the
transformer prior (model_ckpt/<FIRST_STAGE>_prior_best.pt) and the latent diffusion
(model_ckpt/<FIRST_STAGE>_diffusion_best.pt, DDIM-50 and DDPM), each when its checkpoint exists;
each draws VOLUMES volumes (z = 0..31). They are scored by realism.py against the real test
brains, next to real validate brains (the reference: what a perfect generator would score), three
known-bad controls (validate blurred, validate plus noise, validate blurred plus noise) and the
first stage's reconstructions of validate. The controls and the reconstructions are made from
validate, not test, so that they share no anatomy with the brains they are scored against,
exactly as the real validate brains.
Everything goes to visualize/<FIRST_STAGE>_*.png / .gif, log/<FIRST_STAGE>_predict.json and
log/<FIRST_STAGE>_realism.json; with VOLUMES_DIR the generated volumes also go there as data.
"""
import contextlib
import json
import os
import time

import imageio.v3 as iio
import numpy as np
import torch

import dataset
import realism
import util
from latent_dataset import check_same_first_stage, load_latents
from model_critic import load_first_stage_critic
from model_diffusion import decode_latents, diffusion_latents, load_diffusion
from model_diffusion import sample_volumes as diffusion_volumes
from model_prior import SAMPLING_KEYS, load_prior
from model_prior import sample_volumes as prior_volumes
from model_VAE import VQVAE, evaluate_reconstructions, load_first_stage
from module import code_counts_per_position, codebook_stats

# ----------------------------------------------------------------------------- config
FIRST_STAGE = "vqvae"        # first-stage run; its second stages are <FIRST_STAGE>_prior / _diffusion
SPLIT = "test"               # the split whose reconstruction SSIM and codebook usage are reported
VOLUMES = 4                  # volumes drawn per sampler (the real sets have 8 brains each; 8 on a GPU)
DDPM_STEPS = 100             # ancestral DDPM steps, respaced from the 1000 trained ones (config/predict_gpu.py:
                             # all 1000, as the original); 4 volumes x 1000 steps would take ~8 min on 2 cores
BLUR_SIGMA = 1.0             # control: validate blurred by a Gaussian of 1 px at 64x64 (scaled with the size)
NOISE_STD = 0.1              # control: validate plus Gaussian noise of this std (images span [-1, 1])
SPECKLE_STD = 0.075          # control: validate blurred (BLUR_SIGMA) plus noise of this std: about real's sharpness
                             # at 64x64, but as Gaussian speckle, which only the detail kurtosis tells from real
GIF_FRAMES = 50              # DDPM states in the GIF after the noise, evenly spaced to the end (the original's
                             # every 20th of 1000); DDPM_STEPS // GIF_FRAMES steps apart
GIF_FPS = 25                 # GIF stores delays in 1/100 s: 25 fps is exact, 30 would play at 33
GIF_HOLD_SECONDS = 1.0       # the last frame stays this long
TSNE_POINTS = 1024           # latents in the t-SNE plot (at most; drawn evenly)
VOLUMES_DIR = None           # a folder: every sampler's volumes are also written there as data, each sampler's
                             # in its own <VOLUMES_DIR>/<FIRST_STAGE>_<sampler> (the OASIS layout, split test),
                             # which dataset.py, score_scans.py and your own tools read; when the training brains
                             # share the template's frame (the demo brains, aligned NIfTI conversions), also as
                             # NIfTI volumes in MNI152 mm (nifti_test/case_<id>.nii.gz) for any viewer
SEED = 0
CKPT_DIR = "model_ckpt"
LATENT_DIR = "collected_latents"
LOG_DIR = "log"
VISUALIZE_DIR = "visualize"

NUM_Z = dataset.SLICES_PER_BRAIN


def save_denoising_gif(states, decode, sampled, path):
    """Decode each kept DDPM state of one volume but the last and write them as a looping GIF
    whose last frame is `sampled`, the volume (Z, 1, H, W) those states decoded to as predict.py
    scores it (a snap temperature draws its codes afresh at every decode)."""
    frames = np.stack([util.image_grid(decode(state)) for state in states[:-1]] + [util.image_grid(sampled)])
    durations = [1000 / GIF_FPS] * (len(frames) - 1) + [1000 * GIF_HOLD_SECONDS]   # milliseconds
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    iio.imwrite(path, frames, duration=durations, loop=0)


def plot_codebook_usage(counts, path):
    """Codes sorted by how often the split uses them, log scale, with the share in use."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    usage = codebook_stats(counts)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(np.arange(len(counts)), np.sort(counts.cpu().numpy())[::-1] + 1e-1, width=1.0, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("code (sorted by use)")
    ax.set_ylabel("times used")
    ax.set_title(f"codebook usage on {SPLIT}: {usage['active_share']:.1%} of {len(counts)} codes active, "
                 f"perplexity {usage['perplexity']:.0f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return usage


def brain_colours(count):
    """(colormap, norm) giving brains ranked 0..count-1 one distinct colour each, in bands of a
    colour bar (a continuous map, as tab20 alone, gives 8 brains 20 bands and pairs of like hues)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap
    if count <= 20:
        colormap = ListedColormap(plt.get_cmap("tab10" if count <= 10 else "tab20").colors[:count])
    else:
        colormap = plt.get_cmap("turbo", count)
    return colormap, BoundaryNorm(np.arange(count + 1) - 0.5, count)


def plot_tsne(latents, z, brain, path):
    """t-SNE of flattened latents in two panels: coloured by slice index z, and by brain (each
    brain's slices one colour, as the original showed it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE
    keep = torch.linspace(0, len(latents) - 1, min(TSNE_POINTS, len(latents))).long()
    points = TSNE(n_components=2, init="pca", random_state=SEED,
                  perplexity=min(30.0, len(keep) - 1.0)).fit_transform(latents[keep].flatten(1).numpy())
    brain_ids, brain_rank = np.unique(brain[keep].numpy(), return_inverse=True)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, colour, label, (colormap, norm) in ((axes[0], z[keep].numpy(), "slice index z", ("viridis", None)),
                                                (axes[1], brain_rank, "brain", brain_colours(len(brain_ids)))):
        scatter = ax.scatter(points[:, 0], points[:, 1], c=colour, cmap=colormap, norm=norm, s=8)
        colour_bar = fig.colorbar(scatter, ax=ax, label=label)
        if label == "brain":     # one band per brain, ticked with the brains' ids (at most 10 of them)
            ticks = np.unique(np.linspace(0, len(brain_ids) - 1, min(len(brain_ids), 10)).round().astype(int))
            colour_bar.set_ticks(ticks, labels=[str(brain_ids[tick]) for tick in ticks])
        ax.set_title(f"coloured by {label}")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"t-SNE of {FIRST_STAGE} latents ({SPLIT} split): each brain's 32 slices form a path along z")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sources(sources, path, every=4):
    """One row per source: its first volume at every 4th z, to compare them at a glance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    zs = range(0, NUM_Z, every)
    fig, axes = plt.subplots(len(sources), len(zs), figsize=(1.3 * len(zs) + 1.6, 1.35 * len(sources)),
                             squeeze=False)
    for row, (name, volumes) in zip(axes, sources.items()):
        for ax, z in zip(row, zs):
            ax.imshow(volumes[0, z, 0].float().clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(name.replace("_", "\n", 1), fontsize=8, rotation=0, ha="right", va="center")
    for ax, z in zip(axes[0], zs):
        ax.set_title(f"z = {z}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def in_batches(function, volumes, device, batch=256):
    """function(images, z) applied to volumes (V, Z, 1, H, W) in batches; back as volumes on the CPU."""
    slices = volumes.flatten(0, 1)
    z = torch.arange(volumes.shape[1]).repeat(volumes.shape[0])
    out = [function(slices[i:i + batch].to(device), z[i:i + batch].to(device)).float().cpu()
           for i in range(0, len(slices), batch)]
    return torch.cat(out).view_as(volumes)


if __name__ == "__main__":
    util.check_single_process()
    util.check_positive_ints(util.apply_overrides(globals()), ("VOLUMES", "DDPM_STEPS", "GIF_FRAMES", "TSNE_POINTS"))
    util.seed_everything(SEED)
    device = util.get_device()
    collected = load_latents(LATENT_DIR, FIRST_STAGE, SPLIT)
    # the second stages, before any work: one trained on other codes, or not finished, is refused
    prior = diffusion = None
    prior_path = os.path.join(CKPT_DIR, f"{FIRST_STAGE}_prior_best.pt")
    if os.path.isfile(prior_path):
        prior, prior_checkpoint = load_prior(prior_path, device)
        check_same_first_stage(prior_checkpoint, collected, prior_path)
        if set(prior_checkpoint.get("sampling", ())) != set(SAMPLING_KEYS):
            raise util.UserError(f"{prior_path} has no sampling settings {SAMPLING_KEYS} (train_viT.py chooses "
                                 f"them when it finishes; an older version chose others); re-run train_viT.py: "
                                 f"it resumes and chooses them")
    diffusion_path = os.path.join(CKPT_DIR, f"{FIRST_STAGE}_diffusion_best.pt")
    if os.path.isfile(diffusion_path):
        unet, diffusion, diffusion_checkpoint = load_diffusion(diffusion_path, device)
        check_same_first_stage(diffusion_checkpoint, collected, diffusion_path)
        if "sampling" not in diffusion_checkpoint:
            raise util.UserError(f"{diffusion_path} has no sampling settings (stable_diffusion.py chooses its "
                                 f"guidance scale and snap temperature when it finishes); re-run "
                                 f"stable_diffusion.py to finish it")
    first_stage, _ = load_first_stage(collected["checkpoint"], device)
    # the data the latents were collected from (latent_dataset.py's DATA_DIR), as the searches use
    critic, data_dir, img_size = load_first_stage_critic(collected["config"], CKPT_DIR, device)
    loader = dataset.get_dataloader(SPLIT, 32, data_dir, img_size, shuffle=False)
    picture = os.path.join(VISUALIZE_DIR, FIRST_STAGE)
    os.makedirs(VISUALIZE_DIR, exist_ok=True)

    ssim, code_counts = evaluate_reconstructions(first_stage, loader, device, contextlib.nullcontext)
    results = {"first_stage": FIRST_STAGE, "split": SPLIT, "ssim": ssim}
    print(f"{FIRST_STAGE} {SPLIT} SSIM {ssim:.4f}")
    if code_counts is not None:
        usage = plot_codebook_usage(code_counts, f"{picture}_codebook_usage.png")
        results.update(codebook_usage=usage["active_share"], perplexity=usage["perplexity"])
    plot_tsne(diffusion_latents(collected), collected["z"], collected["brain"], f"{picture}_latents_tsne.png")

    train, validate, test = (dataset.OasisSlices(split, data_dir, img_size).volumes()
                             for split in ("train", "validate", "test"))
    noise = torch.randn(validate.shape, generator=torch.Generator().manual_seed(SEED))
    validate_blurred = realism.gaussian_blur(validate.flatten(0, 1), BLUR_SIGMA * img_size / 64).view_as(validate)
    sources = {"real_validate": validate, "validate_blurred": validate_blurred,
               "validate_noisy": (validate + NOISE_STD * noise).clamp(-1, 1),
               "validate_speckled": (validate_blurred + SPECKLE_STD * noise).clamp(-1, 1),
               "reconstruction": in_batches(lambda images, z: first_stage.reconstruct(images, z)[0], validate, device)}
    seconds = {}
    z = torch.arange(NUM_Z, device=device).repeat(VOLUMES)

    def timed(name, draw):
        """Run a sampler from SEED, keep its volumes (V, 32, 1, H, W) on the CPU and its time. Each
        starts from the seed, so its draws do not depend on which other samplers ran before it."""
        util.seed_everything(SEED)
        start = time.time()
        sources[name] = draw().float().cpu().view(VOLUMES, NUM_Z, 1, img_size, img_size)
        seconds[name] = time.time() - start

    with torch.no_grad():
        if isinstance(first_stage, VQVAE):
            train_codes = load_latents(LATENT_DIR, FIRST_STAGE, "train")["indices"]
            histogram = code_counts_per_position(train_codes, first_stage.num_codes).to(device)
            timed("histogram", lambda: first_stage.sample(len(z), z, histogram))
        else:
            timed("gaussian", lambda: first_stage.sample(len(z), z, img_size))
        if prior is not None:
            timed("prior", lambda: prior_volumes(prior, first_stage, device, VOLUMES, **prior_checkpoint["sampling"]))
        if diffusion is not None:
            stats, sampling = diffusion_checkpoint["stats"], diffusion_checkpoint["sampling"]
            guidance, snap_temperature = sampling["guidance"], sampling["snap_temperature"]
            timed("diffusion_ddim50", lambda: diffusion_volumes(unet, diffusion, first_stage, stats, device,
                                                                VOLUMES, steps=50, **sampling))
            gif_states = []

            def ddpm_volumes():
                """All volumes in one batch, each volume's slices sharing one noise trajectory; the
                first volume's states (GIF_FRAMES of them after the noise) are kept for the GIF."""
                latents, states = diffusion.sample_ddpm(unet, (len(z),) + tuple(stats["latent_shape"]), z,
                                                        x0_bound=stats["x0_bound"], noise_groups=VOLUMES,
                                                        keep_every=max(1, DDPM_STEPS // GIF_FRAMES), progress=True,
                                                        steps=DDPM_STEPS, guidance=guidance)
                gif_states.extend(state[:NUM_Z] for state in states)
                return decode_latents(first_stage, latents, stats, z, snap_temperature, noise_groups=VOLUMES)

            timed(f"diffusion_ddpm{DDPM_STEPS}", ddpm_volumes)

            def decode_state(state):
                """Every frame snaps with the same random draws: the frames change with the state alone."""
                with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
                    torch.manual_seed(SEED)
                    return decode_latents(first_stage, state, stats, z[:NUM_Z], snap_temperature, noise_groups=1)

            save_denoising_gif(gif_states, decode_state, sources[f"diffusion_ddpm{DDPM_STEPS}"][0],
                               f"{picture}_denoising.gif")
    if VOLUMES_DIR is not None:
        frame = dataset.data_frame(data_dir)
        if frame is None:
            print(f"{data_dir} records no slice frame that its brains share (OASIS's own slices, NIfTI converted "
                  f"without alignment, or demo brains built before frames were recorded: delete and rebuild them), "
                  f"so the volumes are written as PNG slices only, without NIfTI copies")
        for name in seconds:      # one entry per sampler that ran
            folder = dataset.write_volumes(os.path.join(VOLUMES_DIR, f"{FIRST_STAGE}_{name}"), sources[name],
                                           {"kind": f"generated by {FIRST_STAGE}'s {name} sampler: not real brains",
                                            "first_stage": FIRST_STAGE, "sampler": name, "seed": SEED},
                                           "VOLUMES_DIR", frame=frame)
            print(f"{name}: {VOLUMES} volumes written to {folder}" + (" (and as NIfTI)" if frame else ""))
    for name, volumes in sources.items():
        util.save_image_grid(volumes[0], f"{picture}_generated_{name}.png" if name in seconds
                             else f"{picture}_{name}.png")
    plot_sources(sources, f"{picture}_realism_sources.png")

    start = time.time()
    realism_results = realism.evaluate_sources(sources, critic, train, test)
    realism_results.update(first_stage=FIRST_STAGE, sample_seconds=seconds, metric_seconds=time.time() - start,
                           blur_sigma_px=BLUR_SIGMA * img_size / 64, noise_std=NOISE_STD, speckle_std=SPECKLE_STD,
                           volumes_per_sampler=VOLUMES, seed=SEED)
    print(realism.format_table(realism_results))
    with open(os.path.join(LOG_DIR, f"{FIRST_STAGE}_realism.json"), "w") as f:
        json.dump(realism_results, f, indent=2)
    with open(os.path.join(LOG_DIR, f"{FIRST_STAGE}_predict.json"), "w") as f:
        json.dump(results, f, indent=2)
