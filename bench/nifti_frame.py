"""Where predict.py's NIfTI volumes lie in MNI152 space. For each sampler's folder under
VOLUMES_DIR, the Dice of each volume's brain (grey level above realism.BRAIN_THRESHOLD) with the
template's brain mask, resampled onto the volume's grid by nilearn. Beside them: the real test
brains of the data, written in the same frame (what a generator can hope for: each real brain is
moved a little from the template), and the same brains with their rows flipped (a frame that is
wrong).

    make
    .venv/bin/python predict.py --VOLUMES_DIR=generated
    .venv/bin/python bench/nifti_frame.py
"""
import glob
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import dataset  # noqa: E402
import realism  # noqa: E402
import util  # noqa: E402

# ----------------------------------------------------------------------------- config
VOLUMES_DIR = "generated"    # predict.py's VOLUMES_DIR: one folder per sampler
DATA_DIR = None              # the brains the models trained on (None: the demo brains), for the real test brains


def brain_mask_image(volume):
    """A loaded volume's brain (dataset._brain_mask) as a NIfTI image on its grid."""
    import nibabel
    return nibabel.Nifti1Image(dataset._brain_mask(volume).numpy().astype(np.float32), volume["affine"])


def brain_dice(image, mask, flip_rows=False):
    """Dice of a NIfTI volume's brain with a brain mask (a NIfTI image on any grid, the template's
    say) resampled onto its grid."""
    import nilearn.image
    brain = np.asarray(image.dataobj) > realism.BRAIN_THRESHOLD * 255
    if flip_rows:
        brain = brain[:, ::-1]
    mask = np.asarray(nilearn.image.resample_to_img(mask, image, interpolation="nearest",
                                                    force_resample=True, copy_header=True).dataobj) > 0
    return 2 * (brain & mask).sum() / (brain.sum() + mask.sum())


if __name__ == "__main__":
    util.apply_overrides(globals())
    import nibabel
    folders = sorted(os.path.dirname(path) for path in glob.glob(os.path.join(VOLUMES_DIR, "*", "nifti_test")))
    if not folders:
        raise util.UserError(f"{VOLUMES_DIR} holds no generated NIfTI volumes (<sampler>/nifti_test); run "
                             f"python predict.py --VOLUMES_DIR={VOLUMES_DIR} first")
    size = dataset.data_frame(folders[0])["size"]
    data_dir = dataset.resolve_data_dir(DATA_DIR)
    data_frame = dataset.data_frame(data_dir)
    if data_frame is None:
        raise util.UserError(f"{data_dir} records no slice frame (DATA_DIR: the brains the models trained on)")
    template_mask = brain_mask_image(dataset.load_volume(dataset.template_path("t1")))

    print(f"\nbrain Dice with the MNI152 template's brain mask ({size}x{size} volumes)")
    print(f"{'source':32s} {'volumes':>7s} {'mean Dice':>9s}  range")
    with tempfile.TemporaryDirectory() as scratch:
        real_folder = dataset.write_volumes(os.path.join(scratch, "real_test"),
                                            dataset.OasisSlices("test", data_dir, size).volumes(),
                                            {"kind": "real test brains"}, "VOLUMES_DIR", frame=data_frame)
        for name, folder, flip_rows in ([("real test", real_folder, False)]
                                        + [(os.path.basename(folder), folder, False) for folder in folders]
                                        + [("real test, rows flipped", real_folder, True)]):
            dice = [brain_dice(nibabel.load(path), template_mask, flip_rows)
                    for path in sorted(glob.glob(os.path.join(dataset.nifti_folder(folder, "test"), "*.nii.gz")))]
            print(f"{name:32s} {len(dice):7d} {np.mean(dice):9.3f}  {min(dice):.3f}-{max(dice):.3f}")
