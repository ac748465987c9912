"""OASIS-layout 2-D brain slices: the loader, and the builder of the built-in demo brains.

`python dataset.py` builds the demo brains if needed (or reads DATA_DIR), prints a summary and
renders a grid to visualize/. `--NIFTI_FILES='scans/*_T1w.nii.gz'` converts your own NIfTI
volumes to the same layout instead (`--NIFTI_SPLIT=test` puts them all in the test split;
`--NIFTI_MASK_FILES='scans/*_mask.nii.gz'` strips the skull of scans that still have it).

The demo brains are template-derived demo data, NOT OASIS: pseudo-brains made from the
skull-stripped MNI152 2009a T1 template that ships inside the nilearn package, each with its
own smooth elastic warp, small affine change and intensity change (gamma, bias field).
"""
import fcntl
import functools
import glob
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm import tqdm

import util

# ----------------------------------------------------------------------------- config
DATA_DIR = None            # an OASIS-layout folder; None = the built-in demo brains
IMG_SIZE = 64              # slices are resized (antialiased) to IMG_SIZE x IMG_SIZE: 64, 128, 256
DEMO_DIR = "demo_data"     # where demo brains are built once and cached
DEMO_BRAINS = (48, 8, 8)   # pseudo-brains in train / validate / test (32 slices each)
DEMO_SEED = 0              # the demo set is a pure function of this seed and DEMO_BRAINS
NIFTI_FILES = ""           # glob or comma-separated NIfTI paths to convert (one brain each)
NIFTI_MASK_FILES = ""      # for scans that are not skull-stripped: their brain masks, glob or comma-separated,
                           # one per volume in the order of NIFTI_FILES (a glob's files sorted); outside, voxels are set to 0
NIFTI_OUT_DIR = "nifti_slices"  # where converted NIfTI volumes go
NIFTI_SPLIT = (0.8, 0.1, 0.1)   # shares of the converted volumes in train / validate / test, or one split
                                # name ("test") that gets every volume, e.g. to score a scan or two
NIFTI_ALIGN = True         # align each converted brain to the MNI152 template (affine, on the brain masks) so that
                           # slice z cuts the anatomy it cuts in the demo brains, as OASIS's atlas registration does;
                           # False: slice each brain's own bounding box (a brain with more brainstem sits lower)

SLICES_PER_BRAIN = 32
ALIGN_STEPS = ((6.0, 6.0, 100), (4.0, 2.0, 60))   # alignment: (grid spacing mm, mask blur mm, Adam steps), coarse to fine
NIFTI_LISTED = 8           # the summary lists the sources of up to this many converted volumes
PNG_SIZE = 256
SPLITS = ("train", "validate", "test")
MODES = {"train": ("train",), "validate": ("validate",), "test": ("test",),
         "train_and_validate": ("train", "validate"), "all": SPLITS}
TRAINING_MODES = ("train", "train_and_validate")
IMAGE_NAME = re.compile(r"^case_(\d+)_slice_(\d+)\.nii\.png$")
SEG_NAME = re.compile(r"^seg_(\d+)_slice_(\d+)\.nii\.png$")
SEG_GREY_STEP = 85         # seg labels 0..3 are stored as grey levels 0, 85, 170, 255
EXPECTED_LAYOUT = """expected the OASIS 2-D slice layout:
  DATA_DIR/keras_png_slices_train/case_402_slice_7.nii.png     (brain 402, z-index 7)
  DATA_DIR/keras_png_slices_validate/...
  DATA_DIR/keras_png_slices_test/...
  DATA_DIR/keras_png_slices_seg_{train,validate,test}/seg_402_slice_7.nii.png  (optional)"""


def image_folder(data_dir, split):
    return os.path.join(data_dir, f"keras_png_slices_{split}")


def seg_folder(data_dir, split):
    return os.path.join(data_dir, f"keras_png_slices_seg_{split}")


def nifti_folder(data_dir, split):
    """Where write_volumes puts a split's brains as NIfTI volumes, next to their PNG slices."""
    return os.path.join(data_dir, f"nifti_{split}")


# ----------------------------------------------------------------------------- loader
def present_splits(data_dir):
    """The splits whose image folder exists in `data_dir` (a NIfTI conversion may fill only one)."""
    return [split for split in SPLITS if os.path.isdir(image_folder(data_dir, split))]


def data_fingerprint(data_dir):
    """What names a data set wherever its folder lies: a hash of the name and size of every file in
    its split folders (images and segmentations). A moved or copied folder keeps it; other data,
    or a split with a slice more or less, does not."""
    digest = hashlib.sha256()
    for split in SPLITS:
        for folder in (image_folder(data_dir, split), seg_folder(data_dir, split)):
            if os.path.isdir(folder):
                for name in sorted(os.listdir(folder)):
                    digest.update(f"{os.path.basename(folder)}/{name}:{os.path.getsize(os.path.join(folder, name))}\n"
                                  .encode())
    return digest.hexdigest()[:16]


def _list_slices(folder, pattern):
    """{(brain, z): path} of the files in `folder` whose names match `pattern`."""
    if not os.path.isdir(folder):
        parent = os.path.dirname(folder)
        present = present_splits(parent) if os.path.isdir(parent) else []
        has = f"; {parent} has only the {' and '.join(present)} split" if present else ""
        raise util.UserError(f"data folder {folder} does not exist{has};\n{EXPECTED_LAYOUT}")
    slices = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".png"):
            continue
        match = pattern.match(name)
        if match is None:
            raise util.UserError(f"cannot parse brain id and z-index from {os.path.join(folder, name)}:"
                                 f" expected a name like {pattern.pattern}")
        if int(match[2]) >= SLICES_PER_BRAIN:
            raise util.UserError(f"{os.path.join(folder, name)} is slice {int(match[2])}; a brain has slices "
                                 f"0..{SLICES_PER_BRAIN - 1}")
        slices[int(match[1]), int(match[2])] = os.path.join(folder, name)
    if not slices:
        raise util.UserError(f"no slice PNGs in {folder} (names like {pattern.pattern});\n"
                             f"{EXPECTED_LAYOUT}")
    return slices


def check_splits_hold_different_brains(data_dir):
    """Refuse a brain found in two split folders, whichever split is loaded: a test brain seen in
    training would flatter every test figure."""
    # leniently: an empty or odd folder of a split not loaded is no reason to stop
    brains = {split: {int(match[1]) for match in map(IMAGE_NAME.match, os.listdir(image_folder(data_dir, split)))
                      if match} for split in present_splits(data_dir)}
    for split, other in itertools.combinations(brains, 2):
        shared = brains[split] & brains[other]
        if shared:
            raise util.UserError(f"brain {min(shared)} appears in more than one split folder of {data_dir} "
                                 f"({split} and {other}); splits must hold different brains")


def _read_png(path, img_size, labels):
    """Decode one grey PNG and resize it (nearest neighbour for seg labels, else by area):
    (uint8 (img_size, img_size), size in the file)."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode.startswith("I"):     # a 16-bit PNG: convert("L") would clip it at 255, not scale it
                values = np.asarray(image, dtype=np.float64)
                # seg values that fit 8 bits (labels 0..3, or their grey levels) would all round to 0
                if not (labels and values.max() <= 255):
                    values = np.round(values / 257).clip(0, 255)
                image = Image.fromarray(values.astype(np.uint8))
            image = image.convert("L")
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise util.UserError(f"cannot read image {path}: {error} (corrupt or not a PNG)") from error
    if image.size[0] != image.size[1]:
        raise util.UserError(f"image {path} is {image.size[0]}x{image.size[1]}; expected square slices")
    original_size = image.size
    if image.size != (img_size, img_size):
        image = image.resize((img_size, img_size), Image.Resampling.NEAREST if labels else Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8), original_size


class OasisSlices(Dataset):
    """The slices of one mode ('train', 'validate', 'test', 'train_and_validate', 'all'),
    ordered by (brain, z) so an unshuffled loader yields each brain's 32 slices in order.
    Held decoded as uint8 (all of OASIS is ~0.75 GB so). Items: (image (1, S, S) in [-1, 1],
    seg (1, S, S) labels 0..3 or None, brain id, z-index)."""

    def __init__(self, mode, data_dir=None, img_size=IMG_SIZE):
        if mode not in MODES:
            raise util.UserError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        self.data_dir = resolve_data_dir(data_dir)
        self.img_size = img_size
        check_splits_hold_different_brains(self.data_dir)
        image_paths, seg_paths = {}, {}
        has_seg = all(os.path.isdir(seg_folder(self.data_dir, s)) for s in MODES[mode])
        for split in MODES[mode]:
            images = _list_slices(image_folder(self.data_dir, split), IMAGE_NAME)
            image_paths.update(images)
            if has_seg:
                segs = _list_slices(seg_folder(self.data_dir, split), SEG_NAME)
                if segs.keys() != images.keys():
                    unpaired = sorted(segs.keys() ^ images.keys())[:5]
                    raise util.UserError(f"seg files in {seg_folder(self.data_dir, split)} do not pair "
                                         f"with images in {image_folder(self.data_dir, split)}: "
                                         f"(brain, z) without a partner: {unpaired}")
                seg_paths.update(segs)
        self.keys = sorted(image_paths)
        self.brains = np.array([brain for brain, _ in self.keys])
        self.zs = np.array([z for _, z in self.keys])
        self.images = self._load(image_paths, labels=False)
        self.segs = None
        if has_seg:
            grey = self._load(seg_paths, labels=True)
            # labels saved as they are (0..3, not x 85) would all round to background
            self.segs = grey if grey.max() <= 3 else np.rint(grey / SEG_GREY_STEP).astype(np.uint8)

    def _load(self, paths, labels):
        """Decode the PNGs of self.keys into one uint8 array; all must share one size."""
        array = np.empty((len(self.keys), self.img_size, self.img_size), dtype=np.uint8)
        first_path, first_size = None, None
        for i, key in enumerate(self.keys):
            array[i], size = _read_png(paths[key], self.img_size, labels)
            if first_size is None:
                first_path, first_size = paths[key], size
            elif size != first_size:
                raise util.UserError(f"image {paths[key]} is {size[0]}x{size[1]} but {first_path} is "
                                     f"{first_size[0]}x{first_size[1]}; all slices must share one size")
        return array

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, index):
        image = torch.from_numpy(self.images[index]).float().div(127.5).sub(1).unsqueeze(0)
        seg = None if self.segs is None else torch.from_numpy(self.segs[index]).long().unsqueeze(0)
        return image, seg, int(self.brains[index]), int(self.zs[index])

    def volumes(self):
        """All slices as volumes: (brains, 32, 1, S, S) images in [-1, 1], z = 0..31 in order.
        Every brain must hold all 32 slices."""
        for brain in np.unique(self.brains):
            zs = self.zs[self.brains == brain]
            if not np.array_equal(zs, np.arange(SLICES_PER_BRAIN)):
                raise util.UserError(f"brain {brain} of {self.data_dir} has slices z = {zs.tolist()}; volumes "
                                     f"need z = 0..{SLICES_PER_BRAIN - 1}")
        images = torch.from_numpy(self.images).float().div(127.5).sub(1)
        return images.view(-1, SLICES_PER_BRAIN, 1, self.img_size, self.img_size)


def collate_slices(batch):
    """Stack (image, seg or None, brain, z) items; seg stays None when the data has none."""
    images, segs, brains, zs = zip(*batch)
    seg = None if segs[0] is None else torch.stack(segs)
    return torch.stack(images), seg, torch.tensor(brains), torch.tensor(zs)


def get_dataloader(mode, batch_size, data_dir=None, img_size=IMG_SIZE, shuffle=None,
                   seed=0, num_workers=0, drop_last=None):
    """A DataLoader over OasisSlices(mode) (see util.make_loader). Shuffles only the training
    modes unless told otherwise, and drops the last partial batch only when it shuffles: a
    pass in order (latent collection, evaluation) reads every slice. Worker processes, if any,
    live across epochs (starting them each epoch would cost more than a demo epoch's loading)."""
    shuffle = mode in TRAINING_MODES if shuffle is None else shuffle
    return util.make_loader(OasisSlices(mode, data_dir, img_size), batch_size, shuffle=shuffle, seed=seed,
                            drop_last=shuffle if drop_last is None else drop_last,
                            num_workers=num_workers, persistent_workers=num_workers > 0,
                            collate_fn=collate_slices)


# ----------------------------------------------------------------------------- demo brains / NIfTI
def template_path(kind):
    """Path of the MNI152 2009a template ('t1', 'gm' or 'wm') that ships inside nilearn."""
    import nilearn
    path = os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data",
                        f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz")
    if not os.path.isfile(path):
        raise util.UserError(f"the nilearn package has no {path}; reinstall requirements.txt")
    return path


def _read_nifti(path):
    """(the NIfTI image at `path` in RAS orientation, its voxels as a 3-D float32 array)."""
    import nibabel
    try:
        image = nibabel.as_closest_canonical(nibabel.load(path))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as error:
        raise util.UserError(f"cannot read NIfTI volume {path}: {error}") from error
    if data.ndim > 3 and set(data.shape[3:]) == {1}:     # (X, Y, Z, 1), as some tools write one volume
        data = data.reshape(data.shape[:3])
    if data.ndim != 3:
        raise util.UserError(f"NIfTI volume {path} has shape {data.shape}; expected one 3-D volume "
                             f"(a 4-D series: write each volume to its own file)")
    return image, data


def load_volume(path, tissue_paths=(), mask_path=None):
    """A NIfTI volume in RAS orientation: {'data': (C, X, Y, Z) float32 tensor with intensity in
    [0, 1] first, then any tissue probability maps, 'affine': voxel -> mm (4x4)}. With a brain
    mask (a NIfTI on the same grid), voxels outside it are set to 0: the skull stripped."""
    image, data = _read_nifti(path)
    if mask_path:
        mask_image, mask = _read_nifti(mask_path)
        if mask.shape != data.shape or not np.allclose(mask_image.affine, image.affine, atol=1e-3):
            raise util.UserError(f"brain mask {mask_path} (shape {mask.shape}) is not on the grid of {path} "
                                 f"(shape {data.shape}): give the mask made for that scan")
        data = np.where(mask > 0, data, 0)
    if not (data > 0).any():
        raise util.UserError(f"NIfTI volume {path} has no voxel above 0{' inside its mask' if mask_path else ''}; "
                             f"expected a skull-stripped brain, or its brain mask in NIFTI_MASK_FILES")
    # robust scale: the 99.9th percentile of the brain maps to 0.9, the background stays 0
    data = np.clip(0.9 * data / np.percentile(data[data > 0], 99.9), 0, 1)
    tissue = [_read_nifti(p)[1] for p in tissue_paths]
    channels = [data] + [probability / probability.max() for probability in tissue]
    return {"data": torch.from_numpy(np.stack(channels)), "affine": image.affine}


def _smooth_field(rng, control_points, channels, scale, coords):
    """A smooth random field: N(0, scale) values on a control_points^3 grid, interpolated
    trilinearly at `coords` (..., 3) given in [-1, 1]."""
    grid = torch.from_numpy(rng.normal(0, scale, (1, channels) + (control_points,) * 3)).float()
    points = coords.reshape(1, -1, 1, 1, 3)
    values = torch.nn.functional.grid_sample(grid, points, align_corners=True, padding_mode="border")
    return values.reshape(channels, *coords.shape[:-1]).movedim(0, -1)


def _brain_mask(volume):
    """A volume's brain voxels (X, Y, Z): intensity above 0.05 (masked and skull-stripped
    volumes are 0 outside the brain)."""
    return volume["data"][0] > 0.05


def _brain_world(volume):
    """The world positions (mm, (N, 3)) of a volume's brain voxels."""
    affine = torch.from_numpy(volume["affine"]).float()
    voxels = torch.nonzero(_brain_mask(volume)).float()
    return voxels @ affine[:3, :3].T + affine[:3, 3]


def _brain_box(volume):
    """The box (world mm, (low, high)) of a volume's brain voxels."""
    return tuple(_brain_world(volume).aminmax(dim=0))


def _sample_world(data, affine, points):
    """Channels (C, X, Y, Z) on the grid of `affine` (voxel -> mm), sampled trilinearly at world
    `points` (..., 3): (C, ...), 0 outside the volume."""
    inverse = torch.linalg.inv(torch.as_tensor(affine, dtype=torch.float32))
    voxel_index = points @ inverse[:3, :3].T + inverse[:3, 3]
    sizes = torch.tensor(data.shape[1:], dtype=torch.float32)
    normalised = (2 * voxel_index / (sizes - 1) - 1).flip(-1)  # grid_sample wants (z, y, x)
    sampled = torch.nn.functional.grid_sample(data[None], normalised.reshape(1, -1, 1, 1, 3), align_corners=True)[0]
    return sampled.reshape(len(data), *points.shape[:-1])


def _blurred_mask(volume, sigma_mm):
    """The volume's brain mask (1, X, Y, Z), blurred by a Gaussian of `sigma_mm`: a smooth
    landscape for the alignment to climb."""
    mask = _brain_mask(volume)[None].float()
    voxel_mm = np.sqrt((np.asarray(volume["affine"])[:3, :3] ** 2).sum(0))
    for axis in range(3):
        sigma = max(sigma_mm / voxel_mm[axis], 0.5)
        radius = math.ceil(2 * sigma)
        shape, padding = [1, 1, 1, 1, 1], [0] * 6
        shape[2 + axis] = -1
        padding[4 - 2 * axis] = padding[5 - 2 * axis] = radius       # F.pad counts axes from the last
        mask = torch.nn.functional.conv3d(torch.nn.functional.pad(mask[None], padding),
                                          util.gaussian_taps(sigma, radius).view(shape))[0]
    return mask


def alignment_reference(template):
    """What align_to_template compares every volume with, computed once for all of them: the
    template brain's centre, spread and box, and for each of ALIGN_STEPS a world grid (mm) with
    the template's blurred mask sampled on it."""
    world = _brain_world(template)
    low, high = world.min(0).values, world.max(0).values
    levels = []
    for spacing, sigma, steps in ALIGN_STEPS:
        axes = [torch.arange(start, stop, spacing) for start, stop in zip((low - 10).tolist(), (high + 10).tolist())]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
        levels.append((grid, _sample_world(_blurred_mask(template, sigma), template["affine"], grid)[0], sigma, steps))
    return {"mean": world.mean(0), "std": world.std(0), "bounds": (low, high), "levels": levels}


def align_to_template(volume, reference):
    """The affine (4x4, template world mm -> the volume's world mm) that lays the volume's brain
    mask over the template's (`reference`: alignment_reference), and the overlap it reaches: the
    soft Dice of the two blurred masks over the template's with itself (1: the template's own
    shape). Starts from matching the masks' centres and spreads, then climbs the soft Dice of
    masks blurred less and less (ALIGN_STEPS). Reads only the masks: any contrast, any scanner,
    skull-stripped."""
    brain = _brain_world(volume)
    scale = brain.std(0) / reference["std"]
    linear = torch.diag(scale).requires_grad_()
    shift = (brain.mean(0) - reference["mean"] * scale).requires_grad_()
    for grid, target, sigma, steps in reference["levels"]:
        moving = _blurred_mask(volume, sigma)
        optimizer = torch.optim.Adam([{"params": [linear], "lr": 3e-3}, {"params": [shift], "lr": 0.3}])
        for _ in range(steps):
            moved = _sample_world(moving, volume["affine"], grid @ linear.T + shift)[0]
            dice = 2 * (moved * target).sum() / (moved.sum() + target.sum())
            optimizer.zero_grad()
            (-dice).backward()
            optimizer.step()
    to_volume = torch.eye(4)
    to_volume[:3, :3], to_volume[:3, 3] = linear.detach(), shift.detach()
    return to_volume, (dice / ((target ** 2).sum() / target.sum())).item()


def _slice_planes(low, high):
    """Where render_brain cuts a brain whose box (world mm) runs from `low` to `high`: the box's
    centre and extent, the pixel size (mm) at PNG_SIZE and the heights (mm) of the 32 slices."""
    centre, extent = (low + high) / 2, high - low
    pixel_mm = float(max(extent[0], extent[1])) / (0.78 * PNG_SIZE)  # margin for the warps
    slice_z = low[2] + extent[2] * torch.linspace(0.25, 0.85, SLICES_PER_BRAIN)
    return centre, extent, pixel_mm, slice_z


def slice_frame(low, high):
    """The slices render_brain cuts at a brain box's planes, as a NIfTI volume: {"size": PNG_SIZE,
    "affine": voxel (column, row, slice) -> world mm (RAS), as nested lists}. Columns run left to
    right, rows anterior to posterior, slices up the brain."""
    centre, _, pixel_mm, slice_z = _slice_planes(low, high)
    middle = (PNG_SIZE - 1) / 2
    affine = np.diag([pixel_mm, -pixel_mm, float(slice_z[-1] - slice_z[0]) / (SLICES_PER_BRAIN - 1), 1.0])
    affine[:3, 3] = [float(centre[0]) - middle * pixel_mm, float(centre[1]) + middle * pixel_mm, float(slice_z[0])]
    return {"size": PNG_SIZE, "affine": affine.tolist()}


def scan_frame(volume):
    """The slice_frame of render_brain's cut of `volume` (no warp) in the volume's own world mm:
    the affine that lays its slices over the scan they were cut from, in any viewer. Cut at its
    own box, or (aligned) at the template's planes carried into it by the frame's to_volume."""
    frame = volume.get("frame")
    if frame is None:
        return slice_frame(*_brain_box(volume))
    template_frame = slice_frame(*frame["bounds"])
    to_volume = frame["to_volume"].double().numpy()
    return dict(template_frame, affine=(to_volume @ np.asarray(template_frame["affine"])).tolist())


def resized_frame(frame, img_size):
    """A slice_frame's affine for its slices resized to img_size x img_size: pixel k of the new
    size covers pixels size / img_size * (k .. k + 1) - 0.5 of the old, centred at
    size / img_size * (k + 0.5) - 0.5."""
    factor = frame["size"] / img_size
    resize = np.diag([factor, factor, 1.0, 1.0])
    resize[:2, 3] = (factor - 1) / 2
    return np.asarray(frame["affine"]) @ resize


def render_brain(volume, rng=None):
    """32 axial slices (uint8 (32, 256, 256)) spanning the brain, anterior up, black background,
    and tissue labels (0 background, 1 CSF, 2 grey matter, 3 white matter) when the volume has
    grey- and white-matter maps. With a numpy Generator `rng`, the brain gets a random smooth
    elastic warp, small affine change, gamma and bias field first: a new pseudo-brain per draw.
    A volume with a "frame" ({"bounds": the template brain's box, "to_volume": align_to_template's
    affine}) is cut at the template's slice planes carried into it, not at its own box's."""
    data = volume["data"]
    frame = volume.get("frame")
    centre, extent, pixel_mm, slice_z = _slice_planes(*(_brain_box(volume) if frame is None else frame["bounds"]))
    # output pixel positions in mm: columns run left->right, rows anterior->posterior
    offsets = (torch.arange(PNG_SIZE) - (PNG_SIZE - 1) / 2) * pixel_mm
    zz, yy, xx = torch.meshgrid(slice_z, centre[1] - offsets, centre[0] + offsets, indexing="ij")
    points = torch.stack([xx, yy, zz], dim=-1)

    if rng is not None:
        unit = (points - centre) / (extent / 2)            # the brain's box mapped to [-1, 1]
        angles = np.deg2rad(rng.uniform(-1, 1, 3) * (3, 3, 8))
        rotation = torch.from_numpy(_rotation_matrix(angles)).float()
        scale = torch.from_numpy(rng.uniform(0.92, 1.08) * rng.uniform(0.96, 1.04, 3)).float()
        shift = torch.from_numpy(rng.uniform(-1, 1, 3) * (4, 4, 3)).float()
        warp_mm = _smooth_field(rng, 5, 3, 2.5, unit)
        points = centre + ((points - centre) @ rotation.T) * scale + shift + warp_mm
    if frame is not None:       # the template's slice planes, carried into this brain
        to_volume = frame["to_volume"]
        points = points @ to_volume[:3, :3].T + to_volume[:3, 3]

    sampled = _sample_world(data, volume["affine"], points)
    intensity, brain = sampled[0], sampled[0] > 0.02

    if rng is not None:
        gamma = rng.uniform(0.75, 1.35)
        bias = torch.exp(_smooth_field(rng, 4, 1, 0.08, unit)[..., 0])
        noise = 0.012 * torch.from_numpy(rng.standard_normal(intensity.shape, dtype=np.float32))
        intensity = (intensity.clamp(min=0) ** gamma * bias + noise) * brain
    slices = (intensity.clamp(0, 1) * 255).round().to(torch.uint8).numpy()

    labels = None
    if data.shape[0] == 3:
        grey, white = sampled[1], sampled[2]
        csf = 1 - grey - white
        tissue = torch.where((white >= grey) & (white >= csf), 3, torch.where(grey >= csf, 2, 1))
        labels = (tissue * brain).to(torch.uint8).numpy()
    return slices, labels


def _rotation_matrix(angles):
    """Rotation by angles (radians) about x, then y, then z."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _write_brain(out_dir, split, brain_id, slices, labels, affine=None):
    os.makedirs(image_folder(out_dir, split), exist_ok=True)
    for z, image in enumerate(slices):
        Image.fromarray(image).save(
            os.path.join(image_folder(out_dir, split), f"case_{brain_id}_slice_{z}.nii.png"))
    if affine is not None:      # the same grey levels as one volume, indexed (column, row, slice)
        import nibabel
        image = nibabel.Nifti1Image(np.ascontiguousarray(slices.transpose(2, 1, 0)), affine)
        image.header.set_xyzt_units("mm")
        os.makedirs(nifti_folder(out_dir, split), exist_ok=True)
        nibabel.save(image, os.path.join(nifti_folder(out_dir, split), f"case_{brain_id}.nii.gz"))
    if labels is not None:
        os.makedirs(seg_folder(out_dir, split), exist_ok=True)
        for z, label in enumerate(labels):
            Image.fromarray(label * SEG_GREY_STEP).save(
                os.path.join(seg_folder(out_dir, split), f"seg_{brain_id}_slice_{z}.nii.png"))


def _write_dataset(out_dir, brains, info, setting, nifti_affines=None, replace=True):
    """Write (split, brain_id, slices) brains, slices() giving (uint8 slices (32, S, S), tissue
    labels or None), into this process's own temporary folder and rename it to `out_dir` at the
    end, so an interrupted build never looks finished and processes building at once (torchrun's,
    each finding the demo brains missing) never write into one folder. Each brain in
    `nifti_affines` ({brain_id: its slices' voxel -> mm}) is also written as one NIfTI volume,
    nifti_<split>/case_<id>.nii.gz. An existing `out_dir` is replaced only when this function
    wrote it (it holds dataset_info.json); else the error names `setting`, the constant that chose
    the folder. With replace=False a finished `out_dir` another process wrote meanwhile is kept."""
    if os.path.exists(out_dir) and not os.path.isfile(os.path.join(out_dir, "dataset_info.json")):
        raise util.UserError(f"{out_dir} exists and was not written by dataset.py (no dataset_info.json); "
                             f"choose a new folder ({setting}) rather than overwrite it")
    partial = f"{out_dir.rstrip('/')}.partial-{os.getpid()}"      # a killed build's can be deleted
    shutil.rmtree(partial, ignore_errors=True)

    def build(brain):
        split, brain_id, slices = brain
        _write_brain(partial, split, brain_id, *slices(), affine=(nifti_affines or {}).get(brain_id))

    # brains are independent (each has its own generator) and SciPy / PIL release the GIL: one thread per core
    with ThreadPoolExecutor(max_workers=max(1, min(len(brains), os.cpu_count() or 1))) as pool:
        for _ in tqdm(pool.map(build, brains), total=len(brains), desc=f"writing {out_dir}", unit="brain"):
            pass
    with open(os.path.join(partial, "dataset_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    if replace:
        shutil.rmtree(out_dir, ignore_errors=True)
    try:
        os.replace(partial, out_dir)    # a folder onto a non-empty one fails: nothing is mixed
    except OSError:
        if replace or not os.path.isfile(os.path.join(out_dir, "dataset_info.json")):
            raise
        shutil.rmtree(partial)          # another process finished the same brains first: theirs stay
    return out_dir


def demo_data_dir(brains_per_split, seed, root):
    root = root if os.path.isabs(root) else os.path.join(os.path.dirname(os.path.abspath(__file__)), root)
    return os.path.join(root, "brains_{}-{}-{}_seed{}".format(*brains_per_split, seed))


def build_demo_brains(out_dir, brains_per_split, seed):
    """Build template-derived demo brains (not OASIS) in the OASIS layout: brain i of the
    train / validate / test splits is render_brain(MNI152 template, Generator([seed, i]))."""
    template = load_volume(template_path("t1"), [template_path("gm"), template_path("wm")])
    splits = [split for split, count in zip(SPLITS, brains_per_split) for _ in range(count)]
    brains = [(split, i + 1, functools.partial(render_brain, template, np.random.default_rng([seed, i])))
              for i, split in enumerate(splits)]
    info = {"kind": "template-derived demo brains (MNI152 2009a via nilearn), not OASIS",
            "brains_per_split": list(brains_per_split), "seed": seed,
            # each brain is warped a little, so the template's frame is every brain's only on average
            "slice_frame": slice_frame(*_brain_box(template))}
    return _write_dataset(out_dir, brains, info, "DEMO_DIR", replace=False)


def find_nifti(patterns, name="NIFTI_FILES"):
    """The files `patterns` (the constant `name`) names: comma-separated globs or paths, each
    file once (overlapping globs would make one scan two brains, maybe in two splits)."""
    paths = {}      # {real path: path as matched}, in the order matched
    for pattern in patterns.split(","):
        for path in sorted(glob.glob(pattern.strip())):
            paths.setdefault(os.path.realpath(path), path)
    if not paths:
        raise util.UserError(f"{name} {patterns!r} matched no files; give NIfTI paths or globs, "
                             f"comma-separated, e.g. --{name}='scans/*.nii.gz'")
    return list(paths.values())


def nifti_splits(count, split):
    """The split of each of `count` volumes: all in `split` when it names one; with shares
    (train, validate, test), volume i goes to the split whose cumulative share first exceeds
    (i + 0.5) / count."""
    if isinstance(split, str):
        if split not in SPLITS:
            raise util.UserError(f"NIFTI_SPLIT must be one of {', '.join(SPLITS)} or three shares like "
                                 f"(0.8, 0.1, 0.1), got {split!r}")
        return [split] * count
    if len(split) != 3 or not all(isinstance(s, (int, float)) and s >= 0 for s in split) or sum(split) <= 0:
        raise util.UserError(f"NIFTI_SPLIT must be three shares (train, validate, test) >= 0 with a positive "
                             f"sum, e.g. (0.8, 0.1, 0.1), or one split name like 'test'; got {split!r}")
    bounds = np.cumsum(split) / np.sum(split)
    return [SPLITS[int(np.searchsorted(bounds, (i + 0.5) / count))] for i in range(count)]


def convert_nifti(paths, out_dir, split=NIFTI_SPLIT, mask_paths=(), align=NIFTI_ALIGN):
    """Your NIfTI volumes (sorted by path) to the OASIS layout, one brain each, no augmentation,
    into the splits nifti_splits gives (a split name puts them all there); `mask_paths`, if any,
    gives each volume its brain mask, in the order of `paths`. With `align`, each brain is cut
    at the MNI152 template's slice planes (align_to_template)."""
    if mask_paths and len(mask_paths) != len(paths):
        raise util.UserError(f"NIFTI_MASK_FILES matched {len(mask_paths)} file(s) for {len(paths)} volume(s); "
                             f"give one brain mask per volume, in the order of NIFTI_FILES")
    paths, masks = zip(*sorted(zip(paths, mask_paths or [None] * len(paths))))
    splits = nifti_splits(len(paths), split)
    reference = alignment_reference(load_volume(template_path("t1"))) if align else None
    brains, sources, frames = [], {}, {}
    for i, (path, mask) in enumerate(tqdm(list(zip(paths, masks)), desc="reading" + (" and aligning" if align else ""),
                                          unit="volume")):
        volume = load_volume(path, mask_path=mask)
        sources[i + 1] = {"path": path, "split": splits[i]} | ({"mask": mask} if mask else {})
        if align:
            to_volume, overlap = align_to_template(volume, reference)
            volume["frame"] = {"bounds": reference["bounds"], "to_volume": to_volume}
            sources[i + 1]["alignment_overlap"] = round(overlap, 3)
        frames[i + 1] = scan_frame(volume)
        brains.append((splits[i], i + 1, functools.partial(render_brain, volume)))
    info = {"kind": "converted NIfTI volumes", "sources": sources, "brain_frames": frames}
    if align:       # every brain cut at the template's planes: one frame for all
        info["slice_frame"] = slice_frame(*reference["bounds"])
    return _write_dataset(out_dir, brains, info, "NIFTI_OUT_DIR")


def write_volumes(out_dir, volumes, info, setting, split="test", frame=None, brain_ids=None, brain_frames=None):
    """Volumes (V, 32, 1, S, S) in [-1, 1], generated ones say, as brains `brain_ids` (1..V by
    default) of `split` in the OASIS layout, which OasisSlices(split, out_dir, S).volumes() reads
    back to a grey level. They are quantised by util.grey_levels, as pictures are, so a picture
    shows these values. With `frame` (the slice_frame of the brains they were trained on, see
    data_frame), each is also a NIfTI volume in that frame (nifti_<split>/case_<id>.nii.gz), for
    any viewer or tool. A brain in `brain_frames` ({brain_id: that brain's own frame}, see
    brain_frames: the scan a reconstruction was made from, say) is written in its own frame
    instead. Both are recorded, resized to S, for data_frame and brain_frames to read back.
    `setting`: the constant that named out_dir, for the error if it holds other files."""
    size = volumes.shape[-1]
    brain_ids = [int(brain) for brain in (range(1, len(volumes) + 1) if brain_ids is None else brain_ids)]
    grey = util.grey_levels(volumes)
    brains = [(split, brain, functools.partial(lambda slices: (slices, None), volume[:, 0].numpy()))
              for brain, volume in zip(brain_ids, grey)]
    affines = {}
    if frame is not None:
        shared = resized_frame(frame, size)
        affines = dict.fromkeys(brain_ids, shared)
        info = dict(info, slice_frame={"size": size, "affine": shared.tolist()})
    own = {brain: resized_frame(brain_frames[brain], size) for brain in brain_ids if brain in (brain_frames or {})}
    if own:
        affines.update(own)
        info = dict(info, brain_frames={brain: {"size": size, "affine": affine.tolist()}
                                        for brain, affine in own.items()})
    return _write_dataset(out_dir, brains, info, setting, nifti_affines=affines)


def dataset_info(data_dir):
    """What dataset.py recorded of an OASIS-layout folder (its dataset_info.json), or {}."""
    path = os.path.join(data_dir, "dataset_info.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def data_frame(data_dir):
    """The slice_frame of an OASIS-layout folder's brains, from its dataset_info.json: the demo
    brains' and aligned NIfTI conversions' (every brain cut at the template's planes); None for
    others (OASIS's own slices, brains each cut at its own box) and folders built before frames
    were recorded."""
    return dataset_info(data_dir).get("slice_frame")


def brain_frames(data_dir):
    """Each brain's own frame ({brain_id: frame}) from an OASIS-layout folder's dataset_info.json:
    for NIfTI conversions, aligned or not, the scan_frame that lays the brain's slices over the
    scan it was cut from; {} where none is recorded (demo brains, OASIS's own slices)."""
    return {int(brain): frame for brain, frame in dataset_info(data_dir).get("brain_frames", {}).items()}


def _build_demo_brains_once(data_dir):
    """Build the demo brains unless another process is building them (torchrun's other processes,
    a second script started at once): the first to lock `<folder>.lock` builds, the others wait and
    find them built. The lock ends with its process, so a killed build leaves none held, only its
    `.partial-<pid>` folder, which the next build clears. On a file system that refuses locks
    (some network mounts) every process builds, and _write_dataset still keeps one whole folder."""
    os.makedirs(os.path.dirname(data_dir), exist_ok=True)
    with open(f"{data_dir}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            locked = True
        except OSError:
            locked = False
        if not os.path.isdir(data_dir):
            if locked:      # no other build is under way: any temporary folder is a killed build's
                for stale in glob.glob(f"{glob.escape(data_dir)}.partial-*"):
                    shutil.rmtree(stale, ignore_errors=True)
            build_demo_brains(data_dir, DEMO_BRAINS, DEMO_SEED)


def resolve_data_dir(data_dir=None):
    """`data_dir` checked to exist, or (None) the demo brains, built on first use."""
    if data_dir is None:
        data_dir = demo_data_dir(DEMO_BRAINS, DEMO_SEED, DEMO_DIR)
        if not os.path.isdir(data_dir):
            _build_demo_brains_once(data_dir)
    elif os.path.isfile(data_dir):
        fix = (f"NIfTI volumes convert to one with python dataset.py --NIFTI_FILES={data_dir} --NIFTI_SPLIT=test "
               f"--NIFTI_OUT_DIR=my_scans" if data_dir.endswith((".nii", ".nii.gz"))
               else "an archive (OASIS's slices come as keras_png_slices_data.zip) is unpacked first, and DATA_DIR "
                    "names the folder that holds the keras_png_slices_* folders")
        raise util.UserError(f"DATA_DIR {data_dir} is a file, not a folder of slices; {fix}\n{EXPECTED_LAYOUT}")
    elif not os.path.isdir(data_dir):
        raise util.UserError(f"DATA_DIR {data_dir} does not exist;\n{EXPECTED_LAYOUT}")
    return data_dir


def summarise(data_dir, img_size, grid_path):
    """Print what each split holds (an empty split says so; a NIfTI conversion lists its
    volumes) and save a grid: the 32 slices (4 x 8) of the first test brain, or of the first
    brain of another split when test is empty."""
    data_dir = resolve_data_dir(data_dir)
    present = present_splits(data_dir)
    if not present:
        raise util.UserError(f"{data_dir} holds none of the split folders;\n{EXPECTED_LAYOUT}")
    info = dataset_info(data_dir)
    print(f"data: {os.path.abspath(data_dir)}" + (f" ({info['kind']})" if "kind" in info else ""))
    loaded = {}
    for split in SPLITS:
        if split not in present:
            print(f"  {split:9s} empty: no {os.path.basename(image_folder(data_dir, split))} folder")
            continue
        data = loaded[split] = OasisSlices(split, data_dir, img_size)
        brain_mask = data.images > 0
        line = (f"  {split:9s} {len(data):5d} slices  {len(set(data.brains)):3d} brains  "
                f"z {data.zs.min()}..{data.zs.max()}  brain area {brain_mask.mean():.0%}  "
                f"brain intensity {data.images[brain_mask].mean() / 255:.2f}")
        if data.segs is not None:
            shares = np.bincount(data.segs[brain_mask], minlength=4)[1:] / brain_mask.sum()
            line += "  CSF/GM/WM {:.0%}/{:.0%}/{:.0%}".format(*shares)
        print(line)
    sources = info.get("sources", {})
    for brain, source in list(sources.items())[:NIFTI_LISTED]:
        print(f"  brain {brain} in {source['split']}: {source['path']}"
              + (f" (brain mask {source['mask']})" if "mask" in source else "")
              + (f", aligned to the template: mask overlap {source['alignment_overlap']:.2f} (1 = the "
                 f"template's own)" if "alignment_overlap" in source else ""))
    if len(sources) > NIFTI_LISTED:
        print(f"  ... {len(sources) - NIFTI_LISTED} more volumes: see {os.path.join(data_dir, 'dataset_info.json')}")
    shown = "test" if "test" in present else present[0]
    data = loaded[shown]
    first_brain = [data[i][0] for i in range(len(data)) if data.brains[i] == data.brains[0]]
    util.save_image_grid(torch.stack(first_brain), grid_path, nrow=8)
    print(f"grid of {shown} brain {data.brains[0]}: {grid_path}")


if __name__ == "__main__":
    util.check_single_process()
    util.check_positive_ints(util.apply_overrides(globals(), other_types={"NIFTI_SPLIT": str}), ("IMG_SIZE",))
    if not (isinstance(DEMO_BRAINS, tuple) and len(DEMO_BRAINS) == len(SPLITS)
            and all(type(count) is int and count > 0 for count in DEMO_BRAINS)):
        raise util.UserError(f"DEMO_BRAINS must be three positive integers (train, validate, test), "
                             f"got {DEMO_BRAINS!r}")
    if DEMO_SEED < 0:
        raise util.UserError(f"DEMO_SEED must be a non-negative integer, got {DEMO_SEED}")
    start = time.time()
    if NIFTI_FILES:
        masks = find_nifti(NIFTI_MASK_FILES, "NIFTI_MASK_FILES") if NIFTI_MASK_FILES else ()
        DATA_DIR = convert_nifti(find_nifti(NIFTI_FILES), NIFTI_OUT_DIR, NIFTI_SPLIT, masks, NIFTI_ALIGN)
    summarise(DATA_DIR, IMG_SIZE, os.path.join("visualize", "dataset_grid.png"))
    print(f"done in {time.time() - start:.1f} s")
