import json
import os
import re
import subprocess
import sys
import time

import nibabel
import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import util
from conftest import write_png

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- loader on a fabricated folder
def test_loader_orders_by_brain_then_z_and_scales_to_minus_one_one(oasis_dir):
    data = dataset.OasisSlices("train", str(oasis_dir), img_size=32)
    assert len(data) == 24
    assert [(int(b), int(z)) for b, z in zip(data.brains, data.zs)] == \
        [(3, z) for z in range(12)] + [(10, z) for z in range(12)]
    assert data.images.dtype == np.uint8
    image, seg, brain, z = data[13]
    assert (brain, z) == (10, 1)
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert torch.allclose(image, torch.full_like(image, (10 * 12 + 1) / 127.5 - 1))
    assert seg.shape == (1, 32, 32) and set(seg.unique().tolist()) == {0, 2}


def test_modes_combine_splits(oasis_dir):
    sizes = {mode: len(dataset.OasisSlices(mode, str(oasis_dir), 32)) for mode in dataset.MODES}
    assert sizes == {"train": 24, "validate": 12, "test": 12, "train_and_validate": 36, "all": 48}
    with pytest.raises(util.UserError, match="mode 'training' is not one of"):
        dataset.OasisSlices("training", str(oasis_dir), 32)


def test_resize_is_antialiased(tmp_path):
    checkerboard = (np.indices((32, 32)).sum(0) % 2) * 255
    write_png(str(tmp_path / "keras_png_slices_test/case_1_slice_0.nii.png"), checkerboard)
    small = dataset.OasisSlices("test", str(tmp_path), img_size=16).images[0]
    # a point-sampled resize would give pure 0 or 255; an antialiased one averages to mid-grey
    assert np.all(np.abs(small.astype(int) - 128) <= 1)


def test_dataloader_shuffles_only_training_modes_and_repeats_with_seed(oasis_dir):
    def order(mode, seed):
        loader = dataset.get_dataloader(mode, 4, str(oasis_dir), 32, seed=seed)
        return [(b.item(), z.item()) for _, _, brains, zs in loader for b, z in zip(brains, zs)]
    assert order("test", 0) == [(7, z) for z in range(12)]
    assert order("train", 0) != sorted(order("train", 0))
    assert order("train", 0) == order("train", 0)
    assert order("train", 0) != order("train", 1)
    images, segs, brains, zs = next(iter(dataset.get_dataloader("validate", 5, str(oasis_dir), 32)))
    assert images.shape == (5, 1, 32, 32) and segs.shape == (5, 1, 32, 32)
    assert zs.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16], ids=["8_bit", "16_bit"])
def test_seg_slices_holding_the_labels_themselves_read_as_labels(oasis_dir, dtype):
    """Tissue labels saved as 0..3 rather than OASIS's grey levels 0, 85, 170, 255, in 8 or 16
    bits (16-bit slices are otherwise scaled to 8 bits, which would make every label 0)."""
    as_grey_levels = dataset.OasisSlices("validate", str(oasis_dir), 32).segs
    for path in (oasis_dir / "keras_png_slices_seg_validate").iterdir():
        Image.fromarray((np.asarray(Image.open(path)) // 85).astype(dtype)).save(path)
        assert Image.open(path).mode.startswith("I") == (dtype == np.uint16)
    as_labels = dataset.OasisSlices("validate", str(oasis_dir), 32).segs
    assert set(np.unique(as_labels)) == {0, 1, 2, 3} and np.array_equal(as_labels, as_grey_levels)


def test_seg_is_none_without_seg_folders(oasis_dir):
    for split in dataset.SPLITS:
        os.rename(oasis_dir / f"keras_png_slices_seg_{split}", oasis_dir / f"unused_seg_{split}")
    image, seg, _, _ = dataset.OasisSlices("train", str(oasis_dir), 32)[0]
    assert seg is None
    images, segs, _, _ = next(iter(dataset.get_dataloader("test", 4, str(oasis_dir), 32)))
    assert segs is None and images.shape == (4, 1, 32, 32)


# ----------------------------------------------------------------------------- clear errors
def test_missing_data_dir_prints_expected_layout(tmp_path):
    with pytest.raises(util.UserError, match="(?s)nowhere.*keras_png_slices_train/case_402"):
        dataset.OasisSlices("train", str(tmp_path / "nowhere"), 32)


def test_missing_split_folder_is_named(oasis_dir):
    os.rename(oasis_dir / "keras_png_slices_test", oasis_dir / "elsewhere")
    with pytest.raises(util.UserError, match="keras_png_slices_test does not exist"):
        dataset.OasisSlices("test", str(oasis_dir), 32)


def test_folder_without_matching_files(tmp_path):
    os.makedirs(tmp_path / "keras_png_slices_train")
    (tmp_path / "keras_png_slices_train" / "notes.txt").write_text("no images here")
    with pytest.raises(util.UserError, match="no slice PNGs in .*keras_png_slices_train"):
        dataset.OasisSlices("train", str(tmp_path), 32)


def test_corrupt_png_is_named(oasis_dir):
    bad = oasis_dir / "keras_png_slices_test" / "case_7_slice_4.nii.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(util.UserError, match="cannot read image .*case_7_slice_4.nii.png"):
        dataset.OasisSlices("test", str(oasis_dir), 32)


def test_unparseable_name_is_named(oasis_dir):
    write_png(str(oasis_dir / "keras_png_slices_test" / "case_7_z_4.png"), np.zeros((32, 32)))
    with pytest.raises(util.UserError, match="cannot parse brain id and z-index from .*case_7_z_4.png"):
        dataset.OasisSlices("test", str(oasis_dir), 32)


def test_mixed_image_sizes_name_both_files(oasis_dir):
    write_png(str(oasis_dir / "keras_png_slices_test" / "case_7_slice_9.nii.png"), np.zeros((48, 48)))
    with pytest.raises(util.UserError, match="case_7_slice_9.nii.png is 48x48 but .*case_7_slice_0.nii.png is 32x32"):
        dataset.OasisSlices("test", str(oasis_dir), 32)


def test_seg_files_that_do_not_pair(oasis_dir):
    os.remove(oasis_dir / "keras_png_slices_seg_validate" / "seg_5_slice_3.nii.png")
    with pytest.raises(util.UserError, match=r"do not pair .*\[\(5, 3\)\]"):
        dataset.OasisSlices("validate", str(oasis_dir), 32)


def test_brain_in_two_splits(oasis_dir):
    """Refused whichever split is loaded, and where the two folders hold different slices of it."""
    os.rename(oasis_dir / "keras_png_slices_train" / "case_3_slice_11.nii.png",
              oasis_dir / "keras_png_slices_test" / "case_3_slice_11.nii.png")
    for mode in dataset.MODES:
        with pytest.raises(util.UserError, match=r"brain 3 appears in more than one split .* \(train and test\)"):
            dataset.OasisSlices(mode, str(oasis_dir), 32)


def test_slice_past_the_brains_last_is_named(oasis_dir):
    write_png(str(oasis_dir / "keras_png_slices_test" / "case_7_slice_32.nii.png"), np.zeros((32, 32)))
    with pytest.raises(util.UserError, match="case_7_slice_32.nii.png is slice 32; a brain has slices 0..31"):
        dataset.OasisSlices("test", str(oasis_dir), 32)


def test_16_bit_pngs_are_scaled_to_8_bits_not_clipped(tmp_path):
    """Every 16-bit slice is scaled alike, a dark one too (its values fitting 8 bits)."""
    grey = np.arange(256, dtype=np.uint16).reshape(16, 16)
    folder = tmp_path / "keras_png_slices_test"
    os.makedirs(folder)
    Image.fromarray(grey * 257).save(folder / "case_1_slice_0.nii.png")       # 8-bit grey g is 257 g in 16 bits
    Image.fromarray(grey).save(folder / "case_1_slice_1.nii.png")
    assert all(Image.open(path).mode.startswith("I") for path in folder.iterdir())
    images = dataset.OasisSlices("test", str(tmp_path), 16).images
    assert np.array_equal(images[0], grey) and np.array_equal(images[1], np.rint(grey / 257))


# ----------------------------------------------------------------------------- demo brains
def test_demo_brains_look_like_skull_stripped_axial_t1(demo_dir):
    data = dataset.OasisSlices("all", demo_dir, img_size=256)
    assert len(data) == 4 * 32 and sorted(set(data.brains)) == [1, 2, 3, 4]
    assert data.images.shape[1:] == (256, 256)
    assert data.segs is not None
    border = np.concatenate([data.images[:, :8].ravel(), data.images[:, -8:].ravel(),
                             data.images[:, :, :8].ravel(), data.images[:, :, -8:].ravel()])
    assert border.max() == 0                       # black background around the brain
    brain = data.images > 0
    assert 0.2 < brain.mean() < 0.7
    # T1 contrast: white matter brighter than grey matter, grey brighter than CSF
    means = [data.images[data.segs == label].mean() for label in (1, 2, 3)]
    assert means[0] < means[1] < means[2]
    # middle slices hold more brain than the top ones (axial slices spanning the brain)
    area_by_z = brain.reshape(4, 32, -1).mean(axis=(0, 2))
    assert area_by_z[12:20].mean() > 1.3 * area_by_z[28:].mean()


def test_demo_brains_are_deterministic_and_distinct(demo_dir, tmp_path):
    again = dataset.build_demo_brains(str(tmp_path / "again"), (2, 1, 1), 0)
    name = "keras_png_slices_train/case_2_slice_16.nii.png"
    first = np.asarray(Image.open(os.path.join(demo_dir, name)))
    assert np.array_equal(first, np.asarray(Image.open(os.path.join(again, name))))
    other_brain = np.asarray(Image.open(os.path.join(demo_dir, name.replace("case_2", "case_1"))))
    assert np.abs(first.astype(int) - other_brain).mean() > 5
    assert not [name for name in os.listdir(tmp_path) if ".partial" in name]


def test_processes_building_the_demo_brains_at_once_leave_them_whole(tmp_path):
    """torchrun's processes each found the demo brains missing and built them at once. They once
    shared one temporary folder, each clearing it as it began and replacing the finished folder
    as it ended: a folder of a few slices took the place of the brains, or a process crashed.
    Here a second build begins while the first is under way and ends after it, as they still
    would where the lock that makes the others wait is refused (some network mounts)."""
    go = tmp_path / "second_build_began"
    build = """import os, sys, time
import dataset
dataset.DEMO_DIR, dataset.DEMO_BRAINS = sys.argv[1], (2, 1, 1)
write_brain = dataset._write_brain
def wait_for(path):      # at most a minute, should the other build have failed
    for _ in range(1200):
        if os.path.exists(path):
            return
        time.sleep(0.05)
def paced_write_brain(out_dir, split, brain_id, *rest, **kwargs):
    if sys.argv[2] == "first" and brain_id == 4:     # its last brain waits for the second build to begin
        wait_for(sys.argv[3])
    if sys.argv[2] == "second":                      # begun (its folder cleared): let the first finish first
        open(sys.argv[3], "w").close()
        wait_for(dataset.demo_data_dir(dataset.DEMO_BRAINS, dataset.DEMO_SEED, dataset.DEMO_DIR))
        time.sleep(1)
    write_brain(out_dir, split, brain_id, *rest, **kwargs)
dataset._write_brain = paced_write_brain
print(dataset.build_demo_brains(dataset.demo_data_dir(dataset.DEMO_BRAINS, dataset.DEMO_SEED, dataset.DEMO_DIR),
                                dataset.DEMO_BRAINS, dataset.DEMO_SEED))
"""
    def start(role):
        return subprocess.Popen([sys.executable, "-c", build, str(tmp_path / "demo"), role, str(go)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start("first")
    deadline = time.time() + 120
    while not any((tmp_path / "demo").glob("*.partial*/*/*.png")):   # the first has written slices
        assert time.time() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.05)
    second = start("second")
    outputs = [first.communicate(timeout=300)]
    data_dir = outputs[0][0].strip()
    assert first.returncode == 0, outputs        # (the second build still under way)
    assert [len(dataset.OasisSlices(split, data_dir, 32)) for split in dataset.SPLITS] == [64, 32, 32]
    finished = os.stat(data_dir).st_ino
    outputs.append(second.communicate(timeout=300))
    assert second.returncode == 0 and outputs[1][0].strip() == data_dir, outputs
    assert os.stat(data_dir).st_ino == finished      # the second left the finished folder in place
    assert [len(dataset.OasisSlices(split, data_dir, 32)) for split in dataset.SPLITS] == [64, 32, 32]
    assert os.listdir(tmp_path / "demo") == [os.path.basename(data_dir)]     # no temporary folder left


def test_one_process_builds_the_demo_brains_while_the_others_wait(tmp_path):
    """Processes started at once on a fresh checkout (torchrun's): the first builds the demo
    brains, the others wait for them rather than build them too, and a temporary folder left by
    a build killed earlier is cleared. Here the second asks for them while the first's last brain
    waits for it."""
    go, demo = tmp_path / "second_asks", tmp_path / "demo"
    data_dir = dataset.demo_data_dir((2, 1, 1), dataset.DEMO_SEED, str(demo))
    os.makedirs(f"{data_dir}.partial-999999999/keras_png_slices_train")      # a killed build's
    ask = """import os, sys, time
import dataset
dataset.DEMO_DIR, dataset.DEMO_BRAINS = sys.argv[1], (2, 1, 1)
write_brain, build_demo_brains = dataset._write_brain, dataset.build_demo_brains
def paced_write_brain(out_dir, split, brain_id, *rest, **kwargs):
    if brain_id == 4:      # the first's last brain waits until the second has asked, and a second more
        while not os.path.exists(sys.argv[3]):
            time.sleep(0.05)
        time.sleep(1)
    write_brain(out_dir, split, brain_id, *rest, **kwargs)
def announced_build(*args):
    print("built by", sys.argv[2])
    return build_demo_brains(*args)
dataset._write_brain, dataset.build_demo_brains = paced_write_brain, announced_build
if sys.argv[2] == "second":
    open(sys.argv[3], "w").close()
print(dataset.resolve_data_dir())
"""
    def start(role):
        return subprocess.Popen([sys.executable, "-c", ask, str(demo), role, str(go)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start("first")
    deadline = time.time() + 120
    while not any(demo.glob(f"*.partial-{first.pid}/*/*.png")):     # the first is building
        assert time.time() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.05)
    second = start("second")
    outputs = [process.communicate(timeout=300) for process in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    assert [out for out, _ in outputs] == [f"built by first\n{data_dir}\n", f"{data_dir}\n"]
    assert [len(dataset.OasisSlices(split, data_dir, 32)) for split in dataset.SPLITS] == [64, 32, 32]
    assert sorted(os.listdir(demo)) == [os.path.basename(data_dir), os.path.basename(data_dir) + ".lock"]


def test_a_refused_demo_lock_builds_anyway_and_leaves_other_builds_alone(tmp_path, monkeypatch):
    """A file system that refuses locks: the build goes on unlocked, and a temporary folder there
    may be another process's build under way, so it stays."""
    def refuse(*args):
        raise OSError(37, "No locks available")
    built = []
    monkeypatch.setattr(dataset.fcntl, "flock", refuse)
    monkeypatch.setattr(dataset, "build_demo_brains", lambda out_dir, *args: built.append(out_dir))
    monkeypatch.setattr(dataset, "DEMO_DIR", str(tmp_path))
    other_build = f"{dataset.demo_data_dir(dataset.DEMO_BRAINS, dataset.DEMO_SEED, str(tmp_path))}.partial-1"
    os.makedirs(other_build)
    data_dir = dataset.resolve_data_dir()
    assert built == [data_dir] and os.path.isdir(other_build)


def grey_level_errors(volume, slices, frame):
    """How far `slices` (uint8 (32, S, S)) are from the loaded `volume` (load_volume) resampled by
    nilearn (scipy's trilinear interpolation, not ours) onto the grid of `frame` (a slice_frame):
    the mean grey-level difference inside the brain on that grid, on the grid half a pixel off
    and on the grid with its rows flipped."""
    import nilearn.image
    scaled = nibabel.Nifti1Image(volume["data"][0].numpy(), volume["affine"])    # as load_volume scaled it
    ours = slices.transpose(2, 1, 0).astype(np.float64)                          # (column, row, slice)
    affine = np.asarray(frame["affine"])
    half_pixel_off, rows_flipped = affine.copy(), affine @ np.diag([1.0, -1, 1, 1])
    half_pixel_off[:3, 3] += affine[:3, :3] @ [0.5, 0.5, 0]
    rows_flipped[:3, 3] = affine[:3, 3] + affine[:3, 1] * (ours.shape[1] - 1)
    errors = []
    for grid in (affine, half_pixel_off, rows_flipped):
        resampled = nilearn.image.resample_img(scaled, target_affine=grid, target_shape=ours.shape,
                                               interpolation="linear", force_resample=True, copy_header=True)
        reference = np.asarray(resampled.dataobj)
        reference = np.round(255 * np.clip(reference, 0, 1) * (reference > 0.02))
        errors.append(np.abs(ours - reference)[ours > 0].mean())
    return errors


def test_the_slice_frame_lays_the_slices_on_the_template_in_mm(demo_dir):
    """The template cut by render_brain (no warp) is the template resampled onto the grid of the
    demo brains' recorded slice_frame; the same grid half a pixel off, or with rows flipped, is not."""
    template = dataset.load_volume(dataset.template_path("t1"))
    slices, _ = dataset.render_brain(template)
    frame = dataset.data_frame(demo_dir)
    assert frame == dataset.slice_frame(*dataset._brain_box(template))
    on_grid, half_pixel_off, rows_flipped = grey_level_errors(template, slices, frame)
    assert on_grid < 0.1                                    # 0.015 here
    assert min(half_pixel_off, rows_flipped) > 2            # 5.3 and 41 here


def test_a_resized_frame_puts_each_voxel_at_the_centre_of_those_it_averages():
    frame = {"size": 256, "affine": [[0.8, 0, 0, -90], [0, -0.8, 0, 120], [0, 0, 3, -40], [0, 0, 0, 1]]}
    affine = dataset.resized_frame(frame, 64)
    for column, row, z in ((0, 0, 0), (5, 40, 7), (63, 63, 31)):
        covered = [np.asarray(frame["affine"]) @ [4 * column + i, 4 * row + j, z, 1] for i in range(4) for j in range(4)]
        assert np.allclose(affine @ [column, row, z, 1], np.mean(covered, axis=0))


def write_small_volume(path, data=None, right_mm=0):
    """A NIfTI file at `path`: the MNI152 template at 2 mm (a real skull-stripped T1), or `data`
    on the same grid; with `right_mm`, the grid lies that far to the right of the template's place."""
    import nibabel
    template = nibabel.load(dataset.template_path("t1"))
    small = np.asarray(template.dataobj)[::2, ::2, ::2].astype(np.float32)
    affine = template.affine @ np.diag([2, 2, 2, 1])
    affine[0, 3] += right_mm
    nibabel.save(nibabel.Nifti1Image(small if data is None else data(small), affine), str(path))
    return str(path)


def test_convert_nifti_volumes_to_oasis_layout(tmp_path):
    paths = [write_small_volume(tmp_path / f"scan{i}.nii.gz") for i in range(3)]
    out = dataset.convert_nifti(paths, str(tmp_path / "converted"), (1, 1, 1), align=False)
    for split in dataset.SPLITS:
        data = dataset.OasisSlices(split, out, 64)
        assert len(data) == 32 and data.segs is None
        assert data.images[:, 0].max() == 0 and data.images.max() > 200
    assert dataset.data_frame(out) is None          # each brain cut at its own box: no frame they share


def test_one_volume_into_the_named_split_from_the_command_line(tmp_path):
    scan = write_small_volume(tmp_path / "one_scan.nii.gz")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "dataset.py"), f"--NIFTI_FILES={scan}",
                             "--NIFTI_OUT_DIR=my_scan", "--NIFTI_SPLIT=test"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert f"data: {tmp_path / 'my_scan'} (converted NIfTI volumes)" in out
    assert re.search(r"^  train +empty: no keras_png_slices_train folder$", out, re.M)
    assert re.search(r"^  validate +empty: no keras_png_slices_validate folder$", out, re.M)
    assert re.search(r"^  test +32 slices +1 brains +z 0\.\.31 ", out, re.M)
    assert f"brain 1 in test: {scan}, aligned to the template: mask overlap" in out
    assert "grid of test brain 1: visualize/dataset_grid.png" in out
    assert sorted(os.listdir(tmp_path / "my_scan")) == ["dataset_info.json", "keras_png_slices_test"]
    assert (tmp_path / "visualize" / "dataset_grid.png").exists()
    assert len(dataset.OasisSlices("test", str(tmp_path / "my_scan"), 64)) == 32
    template_box = dataset._brain_box(dataset.load_volume(dataset.template_path("t1")))
    assert dataset.data_frame(str(tmp_path / "my_scan")) == dataset.slice_frame(*template_box)   # aligned: its planes
    # a split that is asked for and missing is still a clear error
    with pytest.raises(util.UserError, match="keras_png_slices_train does not exist; .*my_scan has only the test split"):
        dataset.OasisSlices("train", str(tmp_path / "my_scan"), 64)


def test_a_volume_with_a_trailing_axis_of_one_converts_as_the_3d_volume(tmp_path):
    """(X, Y, Z, 1) files, as some tools write a single volume, give the same slices."""
    plain = dataset.convert_nifti([write_small_volume(tmp_path / "plain.nii.gz")], str(tmp_path / "plain"), "test",
                                  align=False)
    four_d = dataset.convert_nifti([write_small_volume(tmp_path / "four_d.nii.gz", data=lambda volume: volume[..., None])],
                                   str(tmp_path / "four_d"), "test", align=False)
    assert np.array_equal(dataset.OasisSlices("test", plain, 64).images, dataset.OasisSlices("test", four_d, 64).images)


def test_alignment_recovers_a_known_affine_and_cuts_the_template_planes(tmp_path):
    """The template brain moved by a known affine (tilted 10 degrees about left-right, 8% larger,
    shifted) is aligned back: align_to_template finds that affine, and the moved brain converts
    to the template's own slices, which slicing its own bounding box does not give."""
    template = dataset.load_volume(write_small_volume(tmp_path / "template.nii.gz"))
    cos, sin = np.cos(np.deg2rad(10)), np.sin(np.deg2rad(10))
    known = torch.eye(4)
    known[:3, :3] = 1.08 * torch.tensor([[1.0, 0, 0], [0, cos, -sin], [0, sin, cos]])
    known[:3, 3] = torch.tensor([4.0, -6.0, 5.0])
    # the moved brain, on a grid 20 mm wider each way: its value at known(x) is the template's at x
    affine = template["affine"].copy()
    affine[:3, 3] -= 20
    shape = np.array(template["data"].shape[1:]) + 20
    voxels = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij"), -1)
    world = voxels @ torch.from_numpy(affine[:3, :3]).float().T + torch.from_numpy(affine[:3, 3]).float()
    inverse = torch.linalg.inv(known)
    moved = dataset._sample_world(template["data"][:1], template["affine"], world @ inverse[:3, :3].T + inverse[:3, 3])
    moved_path = tmp_path / "moved.nii.gz"
    nibabel.save(nibabel.Nifti1Image(moved[0].numpy(), affine), str(moved_path))

    to_volume, overlap = dataset.align_to_template(dataset.load_volume(str(moved_path)),
                                                   dataset.alignment_reference(template))
    corners = torch.tensor([[x, y, z, 1.0] for x in (-70, 70) for y in (-100, 70) for z in (-70, 80)])
    assert ((corners @ to_volume.T - corners @ known.T)[:, :3].norm(dim=1).max()) < 3      # mm, on 2-mm voxels
    assert overlap > 0.97
    slices = {name: dataset.OasisSlices("test", dataset.convert_nifti([str(path)], str(tmp_path / name), "test",
                                                                      align=align), 64)
              for name, path, align in (("template", tmp_path / "template.nii.gz", True), ("moved", moved_path, True),
                                        ("moved_own_box", moved_path, False))}
    images = {name: torch.from_numpy(data.images).float()[:, None] / 255 for name, data in slices.items()}
    aligned, own_box = (util.ssim(images["template"], images[name]).item() for name in ("moved", "moved_own_box"))
    assert aligned > 0.9 and aligned > own_box + 0.1
    # either way each brain's recorded frame lays its slices over the moved scan, in the scan's own mm
    moved_volume = dataset.load_volume(str(moved_path))
    for name in ("moved", "moved_own_box"):
        slices = dataset.OasisSlices("test", str(tmp_path / name), dataset.PNG_SIZE).images
        on_grid, half_pixel_off, rows_flipped = grey_level_errors(moved_volume, slices,
                                                                  dataset.brain_frames(str(tmp_path / name))[1])
        assert on_grid < 0.3 and min(half_pixel_off, rows_flipped) > 2, name     # 0.05, and 4.4 and 40 here


def test_a_brain_mask_strips_the_skull_of_a_scan(tmp_path, capsys):
    """A scan with its skull, given its brain mask, converts to the slices of the stripped scan;
    masks go with the scans in the order given and must match them in number and grid."""
    stripped = write_small_volume(tmp_path / "a_stripped.nii.gz")
    skull = write_small_volume(tmp_path / "b_skull.nii.gz",
                               data=lambda brain: np.where(brain > 0, brain, 0.8 * brain.max()))   # bright all round
    mask = write_small_volume(tmp_path / "b_mask.nii.gz", data=lambda brain: (brain > 0).astype(np.float32))
    plain = dataset.convert_nifti([stripped], str(tmp_path / "plain"), "test", align=False)
    unmasked = dataset.convert_nifti([skull], str(tmp_path / "unmasked"), "test", align=False)
    masked = dataset.convert_nifti([skull], str(tmp_path / "masked"), "test", [mask], align=False)
    images = {name: dataset.OasisSlices("test", folder, 64).images
              for name, folder in (("plain", plain), ("unmasked", unmasked), ("masked", masked))}
    assert np.array_equal(images["masked"], images["plain"])
    assert not np.array_equal(images["unmasked"], images["plain"])
    dataset.summarise(masked, 64, str(tmp_path / "grid.png"))
    assert f"brain 1 in test: {skull} (brain mask {mask})" in capsys.readouterr().out
    with pytest.raises(util.UserError, match=r"NIFTI_MASK_FILES matched 1 file\(s\) for 2 volume\(s\)"):
        dataset.convert_nifti([stripped, skull], str(tmp_path / "out"), "test", [mask])
    # listed out of path order, each with its own mask (the stripped scan's keeps one hemisphere):
    # the masks follow the scans, they are not sorted apart from them
    half = write_small_volume(tmp_path / "c_half_mask.nii.gz", data=lambda brain: np.where(
        np.arange(len(brain))[:, None, None] < len(brain) // 2, brain > 0, 0).astype(np.float32))
    both = dataset.convert_nifti([skull, stripped], str(tmp_path / "both"), "test", [mask, half], align=False)
    pair = dataset.OasisSlices("test", both, 64)
    assert np.array_equal(pair.images[pair.brains == 2], images["masked"])
    assert (pair.images[pair.brains == 1] > 0).mean() < 0.7 * (images["plain"] > 0).mean()
    other_grid = tmp_path / "other_grid.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.ones((10, 10, 10), np.float32), np.eye(4)), str(other_grid))
    with pytest.raises(util.UserError, match=r"brain mask .*other_grid.nii.gz \(shape \(10, 10, 10\)\) is not on the "
                                             r"grid of .*b_skull.nii.gz"):
        dataset.convert_nifti([skull], str(tmp_path / "out"), "test", [str(other_grid)])


def test_one_volume_by_default_shares_goes_to_train_and_the_summary_copes(tmp_path, capsys):
    out = dataset.convert_nifti([write_small_volume(tmp_path / "scan.nii.gz")], str(tmp_path / "converted"), align=False)
    dataset.summarise(out, 64, str(tmp_path / "grid.png"))
    printed = capsys.readouterr().out
    assert re.search(r"^  train +32 slices +1 brains", printed, re.M)
    assert re.search(r"^  test +empty", printed, re.M) and "grid of train brain 1" in printed
    assert (tmp_path / "grid.png").exists()
    # more volumes than the summary lists: it says how many more, and where they are recorded
    with open(os.path.join(out, "dataset_info.json")) as f:
        info = json.load(f)
    info["sources"] |= {str(brain): info["sources"]["1"] for brain in range(2, dataset.NIFTI_LISTED + 3)}
    with open(os.path.join(out, "dataset_info.json"), "w") as f:
        json.dump(info, f)
    dataset.summarise(out, 64, str(tmp_path / "grid.png"))
    assert f"... 2 more volumes: see {os.path.join(out, 'dataset_info.json')}" in capsys.readouterr().out


def test_nifti_splits_by_share_or_by_name():
    assert dataset.nifti_splits(10, (0.8, 0.1, 0.1)) == ["train"] * 8 + ["validate", "test"]
    assert dataset.nifti_splits(2, (0, 0, 1)) == ["test", "test"]
    assert dataset.nifti_splits(3, "validate") == ["validate"] * 3
    for bad in ("testing", (1, 2), (1, -1, 1), (0, 0, 0)):
        with pytest.raises(util.UserError, match="^NIFTI_SPLIT must be"):
            dataset.nifti_splits(1, bad)


def test_nifti_files_named_twice_are_one_brain(tmp_path, monkeypatch):
    """Overlapping globs (or a path written two ways) name each scan once: twice, it became two
    brains, maybe one in validate and one in test."""
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.nii.gz").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert dataset.find_nifti("*.nii.gz,c.nii.gz,./a.nii.gz") == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    assert dataset.find_nifti("c.nii.gz,*.nii.gz") == ["c.nii.gz", "a.nii.gz", "b.nii.gz"]    # in the order named


def test_nifti_errors_name_the_file_or_folder(tmp_path):
    with pytest.raises(util.UserError, match=r"NIFTI_FILES '.*nothing/\*.nii.gz' matched no files"):
        dataset.find_nifti(str(tmp_path / "nothing/*.nii.gz"))
    empty = write_small_volume(tmp_path / "empty.nii.gz", data=np.zeros_like)
    with pytest.raises(util.UserError, match="empty.nii.gz has no voxel above 0"):
        dataset.convert_nifti([empty], str(tmp_path / "out"))
    series = write_small_volume(tmp_path / "series.nii.gz", data=lambda volume: np.stack([volume, volume], -1))
    with pytest.raises(util.UserError, match=r"series.nii.gz has shape \(\d+, \d+, \d+, 2\); expected one 3-D volume"):
        dataset.convert_nifti([series], str(tmp_path / "out"))
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a volume")
    with pytest.raises(util.UserError, match="cannot read NIfTI volume .*broken.nii.gz"):
        dataset.convert_nifti([str(broken)], str(tmp_path / "out"))


def test_conversion_replaces_its_own_folder_but_no_other(tmp_path):
    scan = write_small_volume(tmp_path / "scan.nii.gz")
    out = str(tmp_path / "converted")
    dataset.convert_nifti([scan], out, "test", align=False)
    dataset.convert_nifti([scan], out, "validate", align=False)
    assert dataset.present_splits(out) == ["validate"]
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(util.UserError, match="precious exists and was not written by dataset.py"):
        dataset.convert_nifti([scan], str(tmp_path / "precious"), "test")
    assert os.listdir(tmp_path / "precious") == ["notes.txt"]


def test_written_volumes_read_back_to_a_grey_level_and_replace_no_other_folder(tmp_path):
    volumes = torch.rand(2, 32, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1   # some out of range
    folder = dataset.write_volumes(str(tmp_path / "generated"), volumes, {"kind": "random volumes"}, "VOLUMES_DIR")
    written = dataset.OasisSlices("test", folder, 16)
    read = written.volumes()
    assert read.shape == volumes.shape
    assert (read - volumes.clamp(-1, 1)).abs().max() <= 1 / 255 + 1e-6     # rounded to the nearest of 256 grey levels
    assert not os.path.exists(dataset.nifti_folder(folder, "test")) and dataset.data_frame(folder) is None
    # in a frame, each is a NIfTI volume too: the same grey levels, (column, row, slice), in that frame's mm
    frame = {"size": 64, "affine": [[2.0, 0, 0, -60], [0, -2.0, 0, 70], [0, 0, 3, -30], [0, 0, 0, 1]]}
    folder = dataset.write_volumes(str(tmp_path / "generated"), volumes, {"kind": "random volumes"}, "VOLUMES_DIR",
                                   frame=frame)
    for brain in (1, 2):
        volume = nibabel.load(os.path.join(dataset.nifti_folder(folder, "test"), f"case_{brain}.nii.gz"))
        assert np.array_equal(np.asarray(volume.dataobj).transpose(2, 1, 0), written.images[32 * (brain - 1):][:32])
        assert np.allclose(volume.affine, dataset.resized_frame(frame, 16)) and volume.header.get_xyzt_units()[0] == "mm"
    assert dataset.data_frame(folder) == {"size": 16, "affine": dataset.resized_frame(frame, 16).tolist()}
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(util.UserError, match=r"precious exists and was not written by dataset.py.*\(VOLUMES_DIR\)"):
        dataset.write_volumes(str(tmp_path / "precious"), volumes, {}, "VOLUMES_DIR")
    assert os.listdir(tmp_path / "precious") == ["notes.txt"]
