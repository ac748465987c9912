"""Evaluate and picture a trained pipeline: first-stage test SSIM and codebook usage, random
generation from every sampler there is, a GIF of the denoising, and a t-SNE of the latents.

    python predict.py                        # the VQVAE pipeline: pre_train, latent_dataset, train_viT,
                                             # stable_diffusion
    python predict.py --FIRST_STAGE=vae      # the VAE pipeline (no prior: it has no codes)

Samplers: the first stage's own (VAE: N(0, I); VQVAE: per-position code histogram), the
transformer prior (model_ckpt/<FIRST_STAGE>_prior_best.pt) and the latent diffusion
(model_ckpt/<FIRST_STAGE>_diffusion_best.pt), each when its checkpoint exists. Each draws one
volume (z = 0..31); its realism score is the mean over slices of the best SSIM against the
test slices at the same z (real validate slices, scored the same way, give a reference).
Everything goes to visualize/<FIRST_STAGE>_*.png / .gif and log/<FIRST_STAGE>_predict.json.
"""
import contextlib
import json
import os

import imageio.v3 as iio
import numpy as np
import torch
from torchvision.utils import make_grid

import dataset
import util
from latent_dataset import load_first_stage, load_latents
from model_VAE import VQVAE
from module import codebook_stats
from pre_train import code_counts_per_position
from pre_train import evaluate as first_stage_ssim
from stable_diffusion import decode_latents, load_diffusion, sample_volume
from train_viT import TEMPERATURE, TOP_K, load_prior

# ----------------------------------------------------------------------------- config
FIRST_STAGE = "vqvae"        # first-stage run; its second stages are <FIRST_STAGE>_prior / _diffusion
SPLIT = "test"               # the split scored
GIF_EVERY = 20               # keep every 20th of the 1,000 DDPM states (the original's GIF)
GIF_FPS = 30
GIF_HOLD_SECONDS = 1.0       # the last frame stays this long
TSNE_POINTS = 1024           # latents in the t-SNE plot (at most; drawn evenly)
SEED = 0
CKPT_DIR = "model_ckpt"
LATENT_DIR = "collected_latents"
LOG_DIR = "log"
VISUALIZE_DIR = "visualize"
NUM_Z = dataset.SLICES_PER_BRAIN


def nearest_slice_ssim(generated, reference_images, reference_z):
    """For each generated slice (z = 0..31 in order), the best SSIM against reference slices of
    the same z: near 1 when it looks like some real slice at that height."""
    scores = []
    for z, image in enumerate(generated):
        candidates = reference_images[reference_z == z]
        scores.append(util.reconstruction_ssim(candidates, image.expand_as(candidates)).max())
    return torch.stack(scores).mean().item()


def grid_frame(images):
    """(32, 1, H, W) images in [-1, 1] -> a 4 x 8 uint8 grid image (H', W')."""
    grid = make_grid(images.float().cpu().add(1).div(2).clamp(0, 1), nrow=8, padding=2)
    return (grid[0] * 255).round().to(torch.uint8).numpy()


def save_denoising_gif(states, decode, path):
    """Decode each kept DDPM state of one volume and write them as a looping GIF."""
    frames = np.stack([grid_frame(decode(state)) for state in states])
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


def plot_tsne(latents, z, path):
    """t-SNE of flattened latents, coloured by slice index z."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE
    keep = torch.linspace(0, len(latents) - 1, min(TSNE_POINTS, len(latents))).long()
    points = TSNE(n_components=2, init="pca", random_state=SEED,
                  perplexity=min(30.0, len(keep) - 1.0)).fit_transform(latents[keep].flatten(1).numpy())
    fig, ax = plt.subplots(figsize=(6, 5))
    scatter = ax.scatter(points[:, 0], points[:, 1], c=z[keep].numpy(), cmap="viridis", s=8)
    fig.colorbar(scatter, ax=ax, label="slice index z")
    ax.set_title(f"t-SNE of {FIRST_STAGE} latents ({SPLIT} split)")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    util.apply_overrides(globals())
    util.seed_everything(SEED)
    device = util.get_device()
    collected = load_latents(LATENT_DIR, FIRST_STAGE, SPLIT)
    first_stage, first_stage_config = load_first_stage(collected["checkpoint"], device)
    data_dir, img_size = first_stage_config["DATA_DIR"], first_stage_config["IMG_SIZE"]
    loader = dataset.get_dataloader(SPLIT, 32, data_dir, img_size, shuffle=False)
    reference = loader.dataset
    reference_images = torch.stack([reference[i][0] for i in range(len(reference))]).to(device)
    reference_z = torch.from_numpy(reference.zs).to(device)
    picture = os.path.join(VISUALIZE_DIR, FIRST_STAGE)
    os.makedirs(VISUALIZE_DIR, exist_ok=True)

    ssim, code_counts = first_stage_ssim(first_stage, loader, device, contextlib.nullcontext)
    results = {"first_stage": FIRST_STAGE, "split": SPLIT, "ssim": ssim}
    print(f"{FIRST_STAGE} {SPLIT} SSIM {ssim:.4f}")
    if code_counts is not None:
        usage = plot_codebook_usage(code_counts, f"{picture}_codebook_usage.png")
        results.update(codebook_usage=usage["active_share"], perplexity=usage["perplexity"])

    plot_tsne(collected["latents"], collected["z"], f"{picture}_latents_tsne.png")

    z = torch.arange(NUM_Z, device=device)
    validate = dataset.OasisSlices("validate", data_dir, img_size)
    first_brain = [i for i in range(len(validate)) if validate.brains[i] == validate.brains[0]]
    real = torch.stack([validate[i][0] for i in first_brain]).to(device)
    realism = {"real_validate_slices": nearest_slice_ssim(real, reference_images, reference_z)}
    with torch.no_grad():
        if isinstance(first_stage, VQVAE):
            train = load_latents(LATENT_DIR, FIRST_STAGE, "train")
            histogram = code_counts_per_position(train["indices"], first_stage.num_codes).to(device)
            generated = {"histogram": first_stage.sample(NUM_Z, z, histogram)}
        else:
            generated = {"gaussian": first_stage.sample(NUM_Z, z, img_size)}
        prior_path = os.path.join(CKPT_DIR, f"{FIRST_STAGE}_prior_best.pt")
        if os.path.isfile(prior_path):
            prior, _ = load_prior(prior_path, device)
            generated["prior"] = first_stage.decode_indices(prior.sample(z, TEMPERATURE, TOP_K), z)
        diffusion_path = os.path.join(CKPT_DIR, f"{FIRST_STAGE}_diffusion_best.pt")
        if os.path.isfile(diffusion_path):
            unet, diffusion, checkpoint = load_diffusion(diffusion_path, device)
            stats = checkpoint["stats"]
            generated["diffusion_ddim50"] = sample_volume(unet, diffusion, first_stage, stats, device, steps=50)
            latents, states = diffusion.sample_ddpm(unet, (NUM_Z,) + tuple(stats["latent_shape"]), z,
                                                    x0_bound=stats["x0_bound"], same_noise=True,
                                                    keep_every=GIF_EVERY, progress=True)
            generated["diffusion_ddpm1000"] = decode_latents(first_stage, latents, stats, z)
            save_denoising_gif(states, lambda state: decode_latents(first_stage, state, stats, z),
                               f"{picture}_denoising.gif")
    for name, images in generated.items():
        realism[name] = nearest_slice_ssim(images, reference_images, reference_z)
        util.save_image_grid(images, f"{picture}_generated_{name}.png")
    results["nearest_test_slice_ssim"] = realism
    for name, score in realism.items():
        print(f"  {name:22s} nearest-{SPLIT}-slice SSIM {score:.4f}")
    with open(os.path.join(LOG_DIR, f"{FIRST_STAGE}_predict.json"), "w") as f:
        json.dump(results, f, indent=2)
