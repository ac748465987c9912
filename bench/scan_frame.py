"""Whether score_scans.py's NIfTI volumes lie over the scans they came from. For each brain of a
folder that score_scans.py --VOLUMES_DIR wrote from a NIfTI conversion, the Dice of its brain
(grey level above realism.BRAIN_THRESHOLD) with its scan's brain (the voxels dataset.py read as
brain: inside the mask given at conversion, above its threshold), resampled onto the volume's
grid by nilearn. Beside it, the same volume given the template's frame instead (MNI152 mm, what
an aligned conversion's brains share: right only for a scan that already lies on the template)
and with its rows flipped (a frame that is wrong).

    python dataset.py --NIFTI_FILES=my_t1.nii.gz --NIFTI_OUT_DIR=my_scans --NIFTI_SPLIT=test
    python score_scans.py --DATA_DIR=my_scans --VOLUMES_DIR=scored
    python bench/scan_frame.py --FOLDER=scored/vqvae_scans_my_scans_reconstructed
"""
import glob
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dataset  # noqa: E402
import util  # noqa: E402
from nifti_frame import brain_dice, brain_mask_image  # noqa: E402

# ----------------------------------------------------------------------------- config
FOLDER = ""                  # a folder score_scans.py --VOLUMES_DIR wrote (<VOLUMES_DIR>/<run>_scans_<folder>_<kind>)


if __name__ == "__main__":
    util.apply_overrides(globals())
    import nibabel
    info = dataset.dataset_info(FOLDER)
    if "data_dir" not in info or not info.get("brain_frames"):
        raise util.UserError(f"FOLDER {FOLDER!r} is not a folder of brains that score_scans.py --VOLUMES_DIR wrote "
                             f"in their scans' frames (its dataset_info.json names no data_dir or brain_frames)")
    sources = dataset.dataset_info(info["data_dir"])["sources"]
    template_frame = info.get("slice_frame")
    print(f"\nbrain Dice with each scan's own brain, resampled onto the volumes written to {FOLDER}")
    print(f"{'brain':>5s} {'scan':40s} {'own frame':>9s} {'template frame':>14s} {'rows flipped':>12s}")
    for path in sorted(glob.glob(os.path.join(dataset.nifti_folder(FOLDER, "*"), "case_*.nii.gz"))):
        brain = int(os.path.basename(path)[len("case_"):-len(".nii.gz")])
        source = sources[str(brain)]
        scan_brain = brain_mask_image(dataset.load_volume(source["path"], mask_path=source.get("mask")))
        image = nibabel.load(path)
        in_template = "-"
        if template_frame is not None:
            moved = nibabel.Nifti1Image(np.asarray(image.dataobj), np.asarray(template_frame["affine"]))
            in_template = f"{brain_dice(moved, scan_brain):.3f}"
        print(f"{brain:5d} {os.path.basename(source['path']):40s} {brain_dice(image, scan_brain):9.3f} "
              f"{in_template:>14s} {brain_dice(image, scan_brain, flip_rows=True):12.3f}")
