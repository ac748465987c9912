"""The brain critic: a small CNN trained on real training slices only (train_critic.py) to tell
each slice's z-index and its tissue labels (background / CSF / grey / white matter).

No pretrained network (Inception for FID, SynthSeg for morphometry) can be downloaded here, so
this stands in for both: its pooled penultimate features feed a brain-domain Frechet distance,
its segmentation gives each slice's tissue fractions, and its z head checks that a generator
drew the slice it was asked for (realism.py). It learns what *this data set* calls a brain.
"""
import os

import torch
import torch.nn.functional as F
from torch import nn

import dataset
import util
from module import group_norm

NUM_TISSUES = 4              # seg labels: 0 background, 1 CSF, 2 grey matter, 3 white matter
TISSUE_NAMES = ("CSF", "GM", "WM")


class ConvBlock(nn.Sequential):
    """Two 3x3 convs, each followed by GroupNorm and SiLU."""

    def __init__(self, in_channels, out_channels):
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, padding=1), group_norm(out_channels), nn.SiLU(),
                         nn.Conv2d(out_channels, out_channels, 3, padding=1), group_norm(out_channels), nn.SiLU())


class BrainCritic(nn.Module):
    """A U-Net: an encoder of ConvBlocks halving the resolution between levels; the z head reads
    every level averaged over space, side by side (the `features`, the Frechet distance's
    embedding: the fine levels see texture, blur and noise, the coarse ones anatomy); the
    segmentation head (optional: the data may have no seg folders) is a decoder with skip
    connections back to full resolution."""

    def __init__(self, channels=(16, 32, 64, 64), num_z_positions=32, segmentation=True):
        super().__init__()
        self.feature_dim = sum(channels)
        self.encoder = nn.ModuleList(ConvBlock(c_in, c_out) for c_in, c_out in zip((1,) + channels[:-1], channels))
        # z also reads the coarsest level's layout on a 4x4 grid: where tissue lies tells z
        self.z_head = nn.Linear(self.feature_dim + 16 * channels[-1], num_z_positions)
        self.decoder = None
        if segmentation:
            # level i's decoder block reads the upsampled level i+1 output next to level i's skip
            self.decoder = nn.ModuleList(ConvBlock(c_up + c_skip, c_skip)
                                         for c_up, c_skip in zip(channels[1:], channels[:-1]))
            self.seg_head = nn.Conv2d(channels[0], NUM_TISSUES, 1)

    def forward(self, images):
        """Images (B, 1, H, W) in [-1, 1], any size ->
        {"features": (B, feature_dim), "z_logits": (B, num_z), "seg_logits": (B, 4, H, W) or None}."""
        skips, h = [], images
        for level, block in enumerate(self.encoder):
            h = block(h if level == 0 else F.avg_pool2d(h, 2))
            skips.append(h)
        features = torch.cat([skip.mean((2, 3)) for skip in skips], dim=1)
        layout = F.adaptive_avg_pool2d(h, 4).flatten(1)
        out = {"features": features, "z_logits": self.z_head(torch.cat([features, layout], dim=1)),
               "seg_logits": None}
        if self.decoder is not None:
            for block, skip in zip(reversed(self.decoder), reversed(skips[:-1])):
                # to the skip's size: an odd size pooled down rounds down
                h = block(torch.cat([F.interpolate(h, size=skip.shape[-2:], mode="nearest"), skip], dim=1))
            out["seg_logits"] = self.seg_head(h)
        return out


def critic_run_name(data_dir, img_size):
    """One critic per data set and image size: critic_<data folder>_<size>px."""
    return f"critic_{os.path.basename(os.path.normpath(data_dir))}_{img_size}px"


def critic_path(ckpt_dir, data_dir, img_size):
    return os.path.join(ckpt_dir, f"{critic_run_name(data_dir, img_size)}.pt")


def load_first_stage_critic(first_stage_config, ckpt_dir, device):
    """The critic of the data and image size a first stage was trained on: (critic, that data's
    folder, the size)."""
    data_dir = dataset.resolve_data_dir(first_stage_config["DATA_DIR"])
    img_size = first_stage_config["IMG_SIZE"]
    critic, _ = load_critic(critic_path(ckpt_dir, data_dir, img_size), device, data_dir, img_size)
    return critic, data_dir, img_size


def refuse_other_data(checkpoint, path, data_dir, img_size):
    """Refuse a critic checkpoint trained on other files than data_dir's or at another size. The
    data is named by its files, not its folder's path: a moved project keeps its critic."""
    trained_on = (checkpoint.get("data_fingerprint"), checkpoint["config"]["IMG_SIZE"])
    if trained_on != (dataset.data_fingerprint(data_dir), img_size):
        # the path names only the folder and the size: the old critic must make way for a new one
        raise util.UserError(f"the brain critic {path} was trained on {checkpoint['data_dir']} at {trained_on[1]}px, "
                             f"not on the files of {os.path.abspath(data_dir)} at {img_size}px; move it aside and "
                             f"train one for this data: python train_critic.py --DATA_DIR={data_dir} "
                             f"--IMG_SIZE={img_size}")


def load_critic(path, device, data_dir=None, img_size=None):
    """A critic trained by train_critic.py, in eval mode: (critic, checkpoint). With data_dir /
    img_size, refuse one trained on other data or at another size."""
    if not os.path.isfile(path):
        raise util.UserError(f"no brain critic at {path}; train it first: python train_critic.py"
                             + (f" --DATA_DIR={data_dir}" if data_dir else "")
                             + (f" --IMG_SIZE={img_size}" if img_size else ""))
    checkpoint = util.load_checkpoint(path)
    if data_dir is not None:
        refuse_other_data(checkpoint, path, data_dir, img_size)
    if checkpoint["epoch"] < checkpoint["config"]["EPOCHS"]:
        raise util.UserError(f"the brain critic {path} stopped at epoch {checkpoint['epoch']} of "
                             f"{checkpoint['config']['EPOCHS']}; re-run train_critic.py (same options) to finish it")
    critic = BrainCritic(**checkpoint["model_args"])
    util.load_weights(critic, checkpoint["model"], path)
    return critic.to(device).eval().requires_grad_(False), checkpoint
