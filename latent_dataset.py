"""Second stage, step 1: encode every slice with a trained first-stage model and keep the
latents, with their slice index z, for the transformer prior and the latent diffusion.

    python latent_dataset.py                     # model_ckpt/vqvae_best.pt -> collected_latents/vqvae_<split>.pt
    python latent_dataset.py --FIRST_STAGE=vae   # the VAE-GAN's posterior means and log-variances

Each split is one file: {"latents": (N, C, h, w) float32 (VQVAE: pre-quantisation latents;
VAE: mean and log-variance stacked on channels), "indices": (N, h, w) VQ codes or None,
"z": (N,), "brain": (N,), "config": the first stage's config with the DATA_DIR encoded,
"checkpoint": its path, "first_stage_weights": a hash of its weights}. The second stages keep
that hash and refuse to resume, or to be sampled, on the latents of a first stage retrained
since. The train split alone sets the second stage's normalisation; validate picks its best
epoch; test is touched once at the end (the original trained its second stage on the test split).
"""
import hashlib
import os

import torch
from tqdm import tqdm

import dataset
import util
from model_VAE import VQVAE, load_first_stage

# ----------------------------------------------------------------------------- config
FIRST_STAGE = "vqvae"        # run name of the first stage: reads model_ckpt/<FIRST_STAGE>_best.pt
DATA_DIR = None              # None: the data the first stage was trained on (its DATA_DIR)
SPLITS = ("train", "validate", "test")
BATCH_SIZE = 64
CKPT_DIR = "model_ckpt"
LATENT_DIR = "collected_latents"


def latent_path(latent_dir, run, split):
    return os.path.join(latent_dir, f"{run}_{split}.pt")


def load_latents(latent_dir, run, split):
    """A file written by this script, with a clear error when it is missing."""
    path = latent_path(latent_dir, run, split)
    if not os.path.isfile(path):
        raise util.UserError(f"collected latents {path} do not exist; run "
                             f"python latent_dataset.py --FIRST_STAGE={run} first")
    return util.load_checkpoint(path)


def weights_fingerprint(module):
    """A short hash of a module's weights (its state_dict): which version of a model encoded what."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_same_first_stage(checkpoint, latents, path):
    """Refuse a second stage's checkpoint (`path`) trained on the latents of another version of
    the first stage than `latents`: retrained or trained on since, its codes mean other things.
    Files from before the hash was kept are let through."""
    trained_on, now = checkpoint.get("first_stage_weights"), latents.get("first_stage_weights")
    if trained_on is not None and now is not None and trained_on != now:
        raise util.UserError(f"{path} was trained on the latents of another version of {latents['checkpoint']} "
                             f"(weights {trained_on}; now {now}): the first stage was retrained or trained on since. "
                             f"Move that run's checkpoints aside to train the second stage afresh on the new latents")


@torch.no_grad()
def collect(model, loader, device):
    """Latents, code indices (VQVAE), z and brain of every slice `loader` yields, in order."""
    latents, indices, zs, brains = [], [], [], []
    for images, _, brain, z in tqdm(loader, desc="encoding", leave=False):
        images, z = images.to(device), z.to(device)
        if isinstance(model, VQVAE):
            encoded = model.encode(images, z)
            indices.append(model.quantize(encoded)[1].cpu())
        else:
            encoded = torch.cat(model.encode(images, z), dim=1)
        latents.append(encoded.float().cpu())
        zs.append(z.cpu())
        brains.append(brain)
    return {"latents": torch.cat(latents), "indices": torch.cat(indices) if indices else None,
            "z": torch.cat(zs), "brain": torch.cat(brains)}


if __name__ == "__main__":
    util.check_single_process()
    util.check_positive_ints(util.apply_overrides(globals()), ("BATCH_SIZE",))
    device = util.get_device()
    checkpoint_path = os.path.join(CKPT_DIR, f"{FIRST_STAGE}_best.pt")
    model, first_stage_config = load_first_stage(checkpoint_path, device)
    data_dir = DATA_DIR if DATA_DIR is not None else first_stage_config["DATA_DIR"]
    for split in SPLITS:
        loader = dataset.get_dataloader(split, BATCH_SIZE, data_dir, first_stage_config["IMG_SIZE"], shuffle=False)
        collected = collect(model, loader, device)
        # the data encoded, for the second stage's searches and predict.py to score against
        collected.update(config=first_stage_config | {"DATA_DIR": data_dir}, checkpoint=checkpoint_path,
                         first_stage_weights=weights_fingerprint(model))
        util.save_checkpoint(collected, latent_path(LATENT_DIR, FIRST_STAGE, split))
        print(f"{split}: {len(collected['z'])} slices -> {latent_path(LATENT_DIR, FIRST_STAGE, split)}, "
              f"latents {tuple(collected['latents'].shape[1:])}")
