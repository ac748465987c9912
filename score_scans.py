"""Score a trained first stage on your own brains: any OASIS-layout folder (e.g. NIfTI volumes
converted by dataset.py), one split.

    python dataset.py --NIFTI_FILES=my_t1.nii.gz --NIFTI_OUT_DIR=my_scans --NIFTI_SPLIT=test
    (a scan with its skull: add --NIFTI_MASK_FILES=my_t1_brain_mask.nii.gz)
    python score_scans.py --DATA_DIR=my_scans                     # the VQVAE of `make`, split test
    python score_scans.py --DATA_DIR=my_scans --FIRST_STAGE=vae

Writes log/<FIRST_STAGE>_scans_<folder>.json and prints:
- reconstruction SSIM per brain and per z (plotted to visualize/<FIRST_STAGE>_scans_<folder>_ssim.png),
  with the first stage's own test SSIM beside it;
- realism figures (realism.py, with the brain critic of the first stage's training data): your
  brains and their reconstructions against the first stage's real test brains (how far your
  scans are from what the models learned), and the reconstructions against your brains (what
  the first stage loses on them: sharpness, tissue, ...);
- visualize/<FIRST_STAGE>_scans_<folder>_brain<id>.png: each brain's 32 slices above their
  reconstructions;
- with VOLUMES_DIR, your brains as scored and their reconstructions as data, and as NIfTI volumes
  that lie over your scans in any viewer.
Slices are resized to the first stage's IMG_SIZE; every brain needs its 32 slices. Each brain's
intensities are first mapped onto those of the first stage's training brains (MATCH_INTENSITY),
and everything above is measured on the matched slices.
"""
import contextlib
import json
import os

import numpy as np
import torch

import dataset
import realism
import util
from model_critic import load_first_stage_critic
from model_VAE import evaluate_reconstructions, load_first_stage

# ----------------------------------------------------------------------------- config
DATA_DIR = ""                # your OASIS-layout folder (required)
SPLIT = "test"               # the split of it to score
FIRST_STAGE = "vqvae"        # the first-stage run: model_ckpt/<FIRST_STAGE>_best.pt
MATCH_INTENSITY = True       # map each of your brains' intensities onto those of the first stage's training brains
                             # (quantile matching inside the brain, per volume) before anything is scored: the models
                             # learned one intensity scale and scanners differ; False: your slices as they are
VOLUMES_DIR = None           # a folder: your brains as scored (at IMG_SIZE, intensities matched) and their
                             # reconstructions also written there as data, in <VOLUMES_DIR>/<FIRST_STAGE>_scans_
                             # <folder>_scored and ..._reconstructed (the OASIS layout, split SPLIT, your brain ids);
                             # each brain also as a NIfTI volume (nifti_<SPLIT>/case_<id>.nii.gz) in its scan's own
                             # mm where DATA_DIR is a NIfTI conversion (lay it over your scan in any viewer), else in
                             # the frame its brains share (the demo brains': MNI152 mm), else none
CKPT_DIR = "model_ckpt"
LOG_DIR = "log"
VISUALIZE_DIR = "visualize"

NUM_Z = dataset.SLICES_PER_BRAIN


def match_intensity(volumes, reference, brain_ids):
    """`volumes` (V, Z, 1, H, W) in [-1, 1] with each volume's brain (every pixel above the
    background's -1, however dark: a threshold would drop a darker scanner's faint pixels and
    shift every quantile) given the intensity distribution of the brains in `reference` (any
    shape): every brain value goes to the reference quantile of its own quantile in its volume,
    so order is kept and only the scale changes. The background stays. A volume without brain
    (all background) is refused, named by its id in `brain_ids`."""
    levels = np.linspace(0, 1, 1001)
    reference = reference.numpy()
    target = np.quantile(reference[reference > -1], levels)
    matched = volumes.clone()
    for volume, brain_id in zip(matched, brain_ids):
        brain = volume > -1
        if not brain.any():
            raise util.UserError(f"brain {brain_id} of DATA_DIR {DATA_DIR} is all background (every pixel at the "
                                 f"lowest grey level): an empty scan, or one that failed to convert")
        values = volume[brain].numpy()
        volume[brain] = torch.from_numpy(np.interp(values, np.quantile(values, levels), target)).to(volume.dtype)
    return matched


def plot_ssim_per_z(ssim, brains, reference, path):
    """Reconstruction SSIM against z, one line per brain, the first stage's test SSIM dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for brain, scores in zip(brains, ssim):
        ax.plot(np.arange(NUM_Z), scores, marker="o", markersize=3, label=f"brain {brain}")
    ax.axhline(reference, color="gray", linestyle="--", label=f"{FIRST_STAGE} on its own test split")
    ax.set_xlabel("slice index z")
    ax.set_ylabel("reconstruction SSIM")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    util.check_single_process()
    util.apply_overrides(globals())
    if SPLIT not in dataset.SPLITS:     # a mode of several splits would be written back as a folder none reads
        raise util.UserError(f"SPLIT must be one of {', '.join(dataset.SPLITS)}, got {SPLIT!r}")
    if not DATA_DIR:
        raise util.UserError("give the folder to score: python score_scans.py --DATA_DIR=my_scans (an OASIS-layout "
                             "folder; dataset.py --NIFTI_FILES=... --NIFTI_SPLIT=test makes one from NIfTI volumes)")
    device = util.get_device()
    first_stage, config = load_first_stage(os.path.join(CKPT_DIR, f"{FIRST_STAGE}_best.pt"), device)
    critic, home_dir, img_size = load_first_stage_critic(config, CKPT_DIR, device)
    scans = dataset.OasisSlices(SPLIT, DATA_DIR, img_size)
    train, test = (dataset.OasisSlices(split, home_dir, img_size).volumes() for split in ("train", "test"))
    brains = np.unique(scans.brains)
    volumes = match_intensity(scans.volumes(), train, brains) if MATCH_INTENSITY else scans.volumes()
    with torch.no_grad():
        reconstructions = torch.stack([first_stage.reconstruct(volume.to(device), torch.arange(NUM_Z, device=device))[0]
                                       .float().cpu() for volume in volumes])
    ssim = torch.stack([util.reconstruction_ssim(v, r) for v, r in zip(volumes, reconstructions)]).numpy()
    home_ssim, _ = evaluate_reconstructions(first_stage, dataset.get_dataloader("test", 32, home_dir, img_size, shuffle=False),
                                    device, contextlib.nullcontext)
    name = f"{FIRST_STAGE}_scans_{os.path.basename(os.path.normpath(DATA_DIR))}"
    os.makedirs(VISUALIZE_DIR, exist_ok=True)
    for brain, volume, reconstruction in zip(brains, volumes, reconstructions):
        util.save_image_grid(torch.cat([volume, reconstruction]),
                             os.path.join(VISUALIZE_DIR, f"{name}_brain{brain}.png"))
    plot_ssim_per_z(ssim, brains, home_ssim, os.path.join(VISUALIZE_DIR, f"{name}_ssim.png"))
    if VOLUMES_DIR is not None:
        frame, own_frames = dataset.data_frame(DATA_DIR), dataset.brain_frames(DATA_DIR)
        nifti = ("and as NIfTI over their scans" if own_frames else "and as NIfTI in the frame they share"
                 if frame else "as PNG slices only: DATA_DIR records no frame (OASIS's own slices, or NIfTI "
                 "converted before frames were recorded: convert them again)")
        for kind, written in (("scored", volumes), ("reconstructed", reconstructions)):
            folder = dataset.write_volumes(os.path.join(VOLUMES_DIR, f"{name}_{kind}"), written,
                                           {"kind": f"your brains {kind} by {FIRST_STAGE}",
                                            "data_dir": os.path.abspath(DATA_DIR), "first_stage": FIRST_STAGE,
                                            "intensity_matched": MATCH_INTENSITY},
                                           "VOLUMES_DIR", split=SPLIT, frame=frame, brain_ids=brains,
                                           brain_frames=own_frames)
            print(f"{len(brains)} {kind} brains written to {folder}, {nifti}")

    against_home = realism.evaluate_sources({"your_scans": volumes, "reconstructions": reconstructions}, critic,
                                            train, test)
    against_scans = realism.evaluate_sources({"reconstructions": reconstructions}, critic, train, volumes)
    results = {"data_dir": os.path.abspath(DATA_DIR), "split": SPLIT, "first_stage": FIRST_STAGE,
               "intensity_matched": MATCH_INTENSITY,
               "ssim": float(ssim.mean()), "ssim_per_brain": {int(b): float(s) for b, s in zip(brains, ssim.mean(1))},
               "ssim_per_z": ssim.mean(0).tolist(), "first_stage_test_ssim": home_ssim,
               "realism_against_first_stage_test": against_home, "realism_against_your_scans": against_scans}
    print(f"{FIRST_STAGE} reconstruction SSIM on {DATA_DIR} ({SPLIT}, {len(brains)} brains"
          + (", intensities matched to its training brains" if MATCH_INTENSITY else "")
          + f"): {results['ssim']:.4f} (its own test split: {home_ssim:.4f})")
    for brain, score in results["ssim_per_brain"].items():
        print(f"  brain {brain}: {score:.4f}")
    print(f"\nyour brains and their reconstructions against {FIRST_STAGE}'s real test brains:")
    print(realism.format_table(against_home))
    print("\nthe reconstructions against your brains:")
    print(realism.format_table(against_scans, reference="your scans"))
    os.makedirs(LOG_DIR, exist_ok=True)
    with open(os.path.join(LOG_DIR, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=2)
