import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(2)

import dataset  # noqa: E402


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """A tiny set of real demo brains (2 train, 1 validate, 1 test; 32 slices each)."""
    return dataset.build_demo_brains(str(tmp_path_factory.mktemp("demo") / "brains"), (2, 1, 1), 0)


def assert_within_eager_spread(graphed, eager, eager_again, names):
    """The state dicts `names` of a checkpoint whose training steps a CUDA graph replayed, against
    two eager runs of the same config: every tensor within 4x the eager runs' own difference (CUDA's
    atomics make them differ) plus 1e-4."""
    for name in names:
        for key, tensor in eager[name].items():
            noise = (tensor.float() - eager_again[name][key].float()).abs().max().item()
            assert (tensor.float() - graphed[name][key].float()).abs().max().item() <= 4 * noise + 1e-4, \
                f"{name}: {key}"


def write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


@pytest.fixture
def oasis_dir(tmp_path):
    """A fabricated OASIS-layout folder: 32x32 slices, brains 3 and 10 in train (z 0..11, so
    names sort differently as text and as numbers), brain 5 in validate, brain 7 in test, with
    seg folders. Pixel values encode (brain, z) so order can be checked."""
    layout = {"train": (3, 10), "validate": (5,), "test": (7,)}
    for split, brains in layout.items():
        for brain in brains:
            for z in range(12):
                image = np.full((32, 32), brain * 12 + z, dtype=np.uint8)
                write_png(str(tmp_path / f"keras_png_slices_{split}/case_{brain}_slice_{z}.nii.png"), image)
                seg = np.zeros((32, 32), dtype=np.uint8)
                seg[8:24, 8:24] = 85 * (1 + z % 3)
                write_png(str(tmp_path / f"keras_png_slices_seg_{split}/seg_{brain}_slice_{z}.nii.png"), seg)
    return tmp_path
