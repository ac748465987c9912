import os
import random
import re
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

import dataset
import util


# ----------------------------------------------------------------------------- SSIM
@pytest.fixture(scope="module")
def slice_pairs(demo_dir):
    """Real demo slices in [0, 1] and degraded copies (noise + blur), (B, 1, 64, 64)."""
    images = torch.from_numpy(dataset.OasisSlices("train", demo_dir, 64).images[::8]).float() / 255
    images = images[:, None]
    generator = torch.Generator().manual_seed(0)
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1)
    degraded = (blurred + 0.05 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    return images, degraded


def test_ssim_of_identical_images_is_one(slice_pairs):
    images, _ = slice_pairs
    assert util.ssim(images, images).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(util.ssim(images, images, size_average=False), torch.ones(len(images)))


def test_ssim_matches_scikit_image_away_from_the_border(slice_pairs):
    """scikit-image uses the same Gaussian window (sigma 1.5, truncate 3.5 -> 11 taps) but
    averages only the map's interior (it crops (11-1)/2 = 5 px); our map pads with zeros and
    keeps the border. Crop our map the same way and the two must agree."""
    images, degraded = slice_pairs
    ours = util.ssim_map(images, degraded)[:, :, 5:-5, 5:-5].flatten(1).mean(1)
    reference = [structural_similarity(a[0].numpy().astype(np.float64), b[0].numpy().astype(np.float64),
                                       gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                       data_range=1.0)
                 for a, b in zip(images, degraded)]
    assert np.allclose(ours.numpy(), reference, atol=1e-4)
    # and the full-image score (borders included) is a per-image mean of the same map
    full = util.ssim(images, degraded, size_average=False)
    assert torch.allclose(full, util.ssim_map(images, degraded).flatten(1).mean(1))
    assert util.ssim(images, degraded).item() == pytest.approx(full.mean().item())


def test_pairwise_ssim_is_reconstruction_ssim_of_every_pair(slice_pairs):
    images, degraded = (2 * x - 1 for x in slice_pairs)          # the models' [-1, 1] range
    a, b = images[:5], torch.cat([degraded[:3], images[:1]])
    matrix = util.pairwise_ssim(a, b, chunk_elements=3 * b.numel())   # two chunks of rows
    expected = torch.stack([util.reconstruction_ssim(a[i:i + 1].expand_as(b), b) for i in range(len(a))])
    assert matrix.shape == (5, 4) and torch.allclose(matrix, expected, atol=1e-5)
    assert matrix[0, 3].item() == pytest.approx(1.0, abs=1e-5)


def test_ssim_falls_as_noise_grows_and_is_symmetric(slice_pairs):
    images, _ = slice_pairs
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(images.shape, generator=generator)
    scores = [util.ssim(images, (images + level * noise).clamp(0, 1)).item() for level in (0.01, 0.05, 0.2)]
    assert scores[0] > scores[1] > scores[2]
    noisy = (images + 0.05 * noise).clamp(0, 1)
    assert util.ssim(images, noisy).item() == pytest.approx(util.ssim(noisy, images).item(), abs=1e-6)


def test_ssim_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        util.ssim(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 9))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ssim_on_cuda_matches_cpu(slice_pairs):
    images, degraded = slice_pairs
    assert util.ssim(images.cuda(), degraded.cuda()).item() == pytest.approx(
        util.ssim(images, degraded).item(), abs=1e-5)


# ----------------------------------------------------------------------------- embedding, seed
def test_sinusoidal_embedding_against_formula():
    positions = torch.tensor([0, 1, 7, 31])
    embedding = util.sinusoidal_embedding(positions, 16)
    assert embedding.shape == (4, 16)
    freqs = np.exp(-np.log(10000.0) * np.arange(8) / 8)
    angles = np.array([0, 1, 7, 31])[:, None] * freqs[None]
    assert np.allclose(embedding.numpy(), np.concatenate([np.cos(angles), np.sin(angles)], 1), atol=1e-5)
    with pytest.raises(ValueError, match="even"):
        util.sinusoidal_embedding(positions, 15)


def test_seed_everything_repeats_all_generators():
    def draw():
        return random.random(), np.random.rand(), torch.rand(3).tolist()
    util.seed_everything(123)
    first = draw()
    util.seed_everything(123)
    assert draw() == first
    util.seed_everything(124)
    assert draw() != first


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_and_config_check(tmp_path):
    path = str(tmp_path / "ckpt" / "last.pt")
    model = torch.nn.Linear(3, 2)
    util.save_checkpoint({"model": model.state_dict(), "config": {"WIDTH": 3, "LR": 0.1}, "epoch": 4}, path)
    loaded = util.load_checkpoint(path, {"WIDTH": 3, "LR": 0.5}, shape_keys=("WIDTH",))
    assert loaded["epoch"] == 4 and torch.equal(loaded["model"]["weight"], model.weight)
    with pytest.raises(util.UserError, match="(?s)another config.*WIDTH: checkpoint 3, script 8"):
        util.load_checkpoint(path, {"WIDTH": 8, "LR": 0.1}, shape_keys=("WIDTH",))


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    util.save_checkpoint({"epoch": 1}, path)

    def dies_midway(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        util.save_checkpoint({"epoch": 2}, path)
    assert util.load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


@pytest.mark.parametrize("links", [True, False])
def test_best_checkpoint_is_written_once_and_kept_when_later_epochs_do_not_improve(tmp_path, monkeypatch, links):
    last, best = str(tmp_path / "last.pt"), str(tmp_path / "best.pt")

    def no_hard_links(*args):
        raise OSError("no hard links on this file system")

    if not links:   # then best gets a copy
        monkeypatch.setattr(os, "link", no_hard_links)
    util.save_checkpoint({"epoch": 1}, last, also=best)
    assert os.path.samefile(last, best) == links
    util.save_checkpoint({"epoch": 2}, last)                # no improvement: best stays at epoch 1
    assert util.load_checkpoint(last)["epoch"] == 2 and util.load_checkpoint(best)["epoch"] == 1
    util.save_checkpoint({"epoch": 3}, last, also=best)
    assert util.load_checkpoint(last)["epoch"] == 3 and util.load_checkpoint(best)["epoch"] == 3
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]


def test_load_refuses_corrupt_missing_and_pickled_objects(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(util.UserError, match="corrupt.pt cannot be read"):
        util.load_checkpoint(str(corrupt))
    with pytest.raises(util.UserError, match="missing.pt does not exist"):
        util.load_checkpoint(str(tmp_path / "missing.pt"))
    pickled = str(tmp_path / "module.pt")
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)   # a whole pickled module, as the original did
    with pytest.raises(util.UserError, match="module.pt cannot be read"):
        util.load_checkpoint(pickled)
    tensor = str(tmp_path / "tensor.pt")
    torch.save(torch.zeros(3), tensor)      # loads under weights_only, but is no checkpoint dict
    with pytest.raises(util.UserError, match="tensor.pt holds a Tensor, not a checkpoint of this project"):
        util.load_checkpoint(tensor, {"IMG_SIZE": 64}, ("IMG_SIZE",))


# ----------------------------------------------------------------------------- config overrides
def script_constants():
    return {"BATCH_SIZE": 16, "LR": 2e-4, "MODE": "VQVAE", "USE_BF16": False,
            "CHANNEL_MULTS": (1, 2, 2), "DATA_DIR": None, "helper": len, "lower_case": 3}


def test_command_line_overrides_with_types():
    namespace = script_constants()
    config = util.apply_overrides(namespace, ["--BATCH_SIZE=8", "--LR=1", "--MODE=VAE", "--USE_BF16=True",
                                              "--CHANNEL_MULTS=[1,2,4]", "--DATA_DIR=/data/oasis"])
    assert config == {"BATCH_SIZE": 8, "LR": 1.0, "MODE": "VAE", "USE_BF16": True,
                      "CHANNEL_MULTS": (1, 2, 4), "DATA_DIR": "/data/oasis"}
    assert namespace["BATCH_SIZE"] == 8 and type(namespace["LR"]) is float


def test_a_second_type_and_bare_text_for_strings():
    def apply(*argv, other_types={"RES_BLOCKS": tuple, "SPLIT": str}):
        return util.apply_overrides({"RES_BLOCKS": 1, "SPLIT": (0.8, 0.1, 0.1), "MODE": "VQVAE"}, list(argv),
                                    other_types=other_types)
    assert apply("--RES_BLOCKS=(1, 2)", "--SPLIT=test", "--MODE=2") == {"RES_BLOCKS": (1, 2), "SPLIT": "test",
                                                                       "MODE": "2"}
    assert apply("--RES_BLOCKS=3", "--SPLIT=[1, 0, 0]") == {"RES_BLOCKS": 3, "SPLIT": (1, 0, 0), "MODE": "VQVAE"}
    with pytest.raises(util.UserError, match="RES_BLOCKS must be an integer or a tuple, e.g. --RES_BLOCKS=1"):
        apply("--RES_BLOCKS=two")
    with pytest.raises(util.UserError, match="RES_BLOCKS must be an integer, e.g. --RES_BLOCKS=1"):
        apply("--RES_BLOCKS=(1, 2)", other_types={})


def test_types_come_from_the_scripts_defaults_whatever_set_the_constant_before(tmp_path):
    """A None default takes None or text (folders named 2024 or True are folders), and True /
    False only where other_types allows bool (USE_BF16's "decide for me"); a constant an earlier
    argument gave its other type still takes its default's type."""
    config = util.apply_overrides(script_constants(), ["--DATA_DIR=2024"])
    assert config["DATA_DIR"] == "2024"
    assert util.apply_overrides(script_constants(), ["--DATA_DIR=True"])["DATA_DIR"] == "True"
    assert util.apply_overrides(script_constants(), ["--DATA_DIR=/data", "--DATA_DIR=None"])["DATA_DIR"] is None
    decided = util.apply_overrides({"USE_BF16": None}, ["--USE_BF16=False"], other_types={"USE_BF16": bool})
    assert decided["USE_BF16"] is False
    preset = tmp_path / "numbered.py"
    preset.write_text("DATA_DIR = 2024\n")           # in a config file a string is written as one
    with pytest.raises(util.UserError, match="DATA_DIR must be None or a string, .*got 2024$"):
        util.apply_overrides(script_constants(), [str(preset)])
    preset = tmp_path / "one_split.py"
    preset.write_text("SPLIT = 'test'\n")
    namespace = {"SPLIT": (0.8, 0.1, 0.1)}
    config = util.apply_overrides(namespace, [str(preset), "--SPLIT=(0.5, 0.5, 0)"], other_types={"SPLIT": str})
    assert config["SPLIT"] == (0.5, 0.5, 0)


def test_positive_int_check_names_the_constant():
    util.check_positive_ints({"EPOCHS": 3, "BATCH_SIZE": 1}, ("EPOCHS", "BATCH_SIZE"))
    for bad in (0, -2, 2.0, True):
        with pytest.raises(util.UserError, match=f"^BATCH_SIZE must be a positive integer, got {bad!r}$"):
            util.check_positive_ints({"EPOCHS": 3, "BATCH_SIZE": bad}, ("EPOCHS", "BATCH_SIZE"))


@pytest.mark.parametrize("argument, message", [
    ("--BATCH=8", "unknown constant 'BATCH'"),
    ("--lower_case=1", "unknown constant 'lower_case'"),
    ("--BATCH_SIZE=1.5", r"BATCH_SIZE must be an integer, e.g. --BATCH_SIZE=16 \(its default\); got 1.5$"),
    ("--BATCH_SIZE=True", "BATCH_SIZE must be an integer"),
    ("--USE_BF16=1", "USE_BF16 must be True or False, e.g. --USE_BF16=False"),
    ("--LR=fast", "LR must be a number, e.g. --LR=0.0002 .*; got 'fast'$"),
    ("--CHANNEL_MULTS=(1, 2", r"CHANNEL_MULTS must be a tuple, e.g. --CHANNEL_MULTS='\(1, 2, 2\)'"),
    ("--LR", "expected --NAME=value"),
    ("missing_preset.py", "config file missing_preset.py does not exist"),
])
def test_bad_overrides_are_clear_errors(argument, message):
    with pytest.raises(util.UserError, match=message):
        util.apply_overrides(script_constants(), [argument])


A_SCRIPT = '''"""Trains a thing."""
import os

ROOT = os.path.dirname(__file__)

# ----------------------------------------------------------------------------- config
EPOCHS = 3                   # passes over the data
LR = 1e-3                    # the peak learning rate,
                             # decayed to LR / 10
# model
CHANNELS = (8, 16)

SHAPE_KEYS = ("CHANNELS",)   # not a setting: after the config block's blank line
'''


def test_only_the_config_block_is_settable_and_help_lists_it_with_its_comments(tmp_path, capsys):
    (tmp_path / "train_thing.py").write_text(A_SCRIPT)
    namespace = runpy.run_path(str(tmp_path / "train_thing.py"))
    assert util.config_names(namespace) == ["EPOCHS", "LR", "CHANNELS"]
    with pytest.raises(util.UserError, match="unknown constant 'SHAPE_KEYS'; this script has: CHANNELS, EPOCHS, LR$"):
        util.apply_overrides(dict(namespace), ["--SHAPE_KEYS=()"])
    with pytest.raises(SystemExit) as stop:
        util.apply_overrides(namespace, ["--EPOCHS=5", "--help", "--LR=oops"])    # help at once, as set so far
    assert stop.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["usage: python train_thing.py [config/preset.py ...] [--NAME=value ...]", "", "Trains a thing."]
    constants = lines[lines.index("Trains a thing.") + 3:]
    assert [line.split("#")[0].rstrip() for line in constants] == ["EPOCHS = 5", "LR = 0.001", "", "CHANNELS = (8, 16)"]
    assert [line.split("#", 1)[-1] for line in constants[:3]] == [" passes over the data", " the peak learning rate,",
                                                                 " decayed to LR / 10"]


def test_config_file_then_command_line(tmp_path):
    preset = tmp_path / "gpu.py"
    preset.write_text("# a preset\nBATCH_SIZE = 64\nCHANNEL_MULTS = (1, 1, 2, 2, 4)\n_scratch = 1\n")
    namespace = script_constants()
    config = util.apply_overrides(namespace, [str(preset), "--BATCH_SIZE=32"])
    assert config["BATCH_SIZE"] == 32 and config["CHANNEL_MULTS"] == (1, 1, 2, 2, 4)
    preset.write_text("BACTH_SIZE = 64\n")
    with pytest.raises(util.UserError, match="gpu.py: unknown constant 'BACTH_SIZE'"):
        util.apply_overrides(script_constants(), [str(preset)])
    preset.write_text("LR = '1e-3'\n")
    with pytest.raises(util.UserError, match=r"gpu.py: LR must be a number, e.g. LR = 0.0002 \(its default\); got '1e-3'"):
        util.apply_overrides(script_constants(), [str(preset)])
    preset.write_text("LR = 1e-3 +\n")
    with pytest.raises(util.UserError, match="config file .*gpu.py cannot be run .*SyntaxError.*NAME = value lines"):
        util.apply_overrides(script_constants(), [str(preset)])


def test_reconstruction_ssim_maps_minus_one_one_and_clamps(slice_pairs):
    images, degraded = slice_pairs
    signed, signed_degraded = images * 2 - 1, degraded * 2 - 1
    expected = util.ssim(images, degraded, size_average=False)
    assert torch.allclose(util.reconstruction_ssim(signed, signed_degraded), expected, atol=1e-6)
    overshoot = signed_degraded + 0.5 * (signed_degraded > 0.99)    # decoder output past tanh's range
    assert torch.allclose(util.reconstruction_ssim(signed, overshoot), expected, atol=1e-6)


def test_picture_grid_holds_torchvisions_grey_levels_in_one_channel(slice_pairs, tmp_path):
    """save_image_grid against torchvision's save_image (RGB) on a real slice, a decoder's
    overshoot past [-1, 1] and values on both sides of each rounding edge."""
    from PIL import Image
    from torchvision.utils import save_image
    images, degraded = slice_pairs
    edges = (torch.arange(256.0) / 255 * 2 - 1)[:, None] + torch.tensor([-1e-3, 1e-3, 1 / 255])   # x.5 levels
    awkward = torch.cat([edges.flatten(), torch.tensor([-1.7, 1.3])]).repeat(6)[:64 * 64].reshape(1, 1, 64, 64)
    batch = torch.cat([images[:3] * 2 - 1, degraded[:3] * 2 - 1, awkward])
    util.save_image_grid(batch, str(tmp_path / "ours.png"), nrow=3)
    save_image(batch.add(1).div(2).clamp(0, 1), str(tmp_path / "torchvision.png"), nrow=3, padding=2)
    with Image.open(tmp_path / "ours.png") as ours, Image.open(tmp_path / "torchvision.png") as reference:
        assert ours.mode == "L" and reference.mode == "RGB"
        assert np.array_equal(np.asarray(ours), np.asarray(reference)[..., 0])
    assert np.array_equal(util.grey_levels(batch).numpy(),
                          np.floor(((batch.numpy() + 1) / 2).clip(0, 1) * 255 + 0.5).astype(np.uint8))


LEAVE_AFTER_TRAINING = """
import atexit, sys, torch
sys.path.insert(0, {root!r})
import util
util.setup_distributed()
rank = torch.distributed.get_rank()
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Conv2d(2, 2, 1))
model(torch.randn(4, 2, 3, 3)).square().mean().backward()
torch.distributed.barrier()
with util.main_process_alone(rank == 0):
    atexit.register(print, "Python's shutdown ran")
    print(f"rank {{rank}} went on alone: initialized {{torch.distributed.is_initialized()}}")
    {failure}
"""


def run_two_cpu_processes(script, source, status=0):
    """`source` (its {root} the project's folder) written to `script` and run by torchrun in two CPU
    processes (gloo); the finished process, checked to have exited with `status`."""
    script.write_text(source.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                             str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == status, result.stderr[-3000:]
    return result


def test_only_the_main_process_goes_on_after_training(tmp_path):
    """Two torchrun processes leave together; the main one goes on without a process group, the
    other ends cleanly (exit 0, nothing after the call), and the main one ends as cleanly, past
    Python's shutdown, where gloo's threads could abort it."""
    result = run_two_cpu_processes(tmp_path / "train.py", LEAVE_AFTER_TRAINING.replace("{failure}", "pass"))
    assert result.stdout.split("\n").count("rank 0 went on alone: initialized False") == 1
    assert "rank 1" not in result.stdout and "shutdown ran" not in result.stdout


@pytest.mark.parametrize("failure, printed", [
    ('raise util.UserError("no test split in the data folder")', r"^no test split in the data folder$"),
    ('raise RuntimeError("sampling went wrong")', r"^Traceback \(most recent call last\):$(.|\n)*sampling went wrong")],
    ids=["user_error", "exception"])
def test_a_main_process_failing_alone_ends_with_status_1_and_its_error(tmp_path, failure, printed):
    """An error while testing or sampling stops the main process as it would stop a one-process
    run, its error printed (a UserError's sentence, else the traceback) and status 1, and past
    Python's shutdown, where gloo's threads could turn that into SIGABRT."""
    result = run_two_cpu_processes(tmp_path / "train.py", LEAVE_AFTER_TRAINING.replace("{failure}", failure),
                                   status=1)
    assert re.search(printed, result.stderr, re.MULTILINE)
    assert re.search(r"rank\s*: 0 .*\n\s*exitcode\s*: 1 ", result.stderr)
    assert "rank 0 went on alone" in result.stdout and "shutdown ran" not in result.stdout
    assert "terminate called" not in result.stderr


OWN_NUMBERS = """
import sys, torch
sys.path.insert(0, {root!r})
import util
util.setup_distributed()
rank = torch.distributed.get_rank()
util.seed_everything(0)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Conv2d(2, 2, 1))
draws, weights = [None, None], [None, None]
torch.distributed.all_gather_object(draws, torch.rand(3))
torch.distributed.all_gather_object(weights, model.module.weight.detach())
with util.main_process_alone(rank == 0):     # as the training scripts end
    torch.manual_seed(0)
    torch.nn.Conv2d(2, 2, 1)
    print("main draws as one process:", torch.equal(draws[0], torch.rand(3)))
    print("processes draw alike:", torch.equal(draws[0], draws[1]))
    print("models alike:", torch.equal(weights[0], weights[1]))
"""


def test_torchrun_processes_draw_their_own_random_numbers_from_models_alike(tmp_path):
    """Seeded alike, every process would draw the same random latents and noise for its share of
    the batch; the main one draws what one process would."""
    result = run_two_cpu_processes(tmp_path / "draw.py", OWN_NUMBERS)
    assert "main draws as one process: True\nprocesses draw alike: False\nmodels alike: True" in result.stdout


PROCESS_LOSSES = """
import sys, torch
sys.path.insert(0, {root!r})
import util
from logger import TrainingLog, read_log
util.setup_distributed()
rank = torch.distributed.get_rank()
log = TrainingLog({log!r}) if rank == 0 else None
torch.distributed.barrier()
values = util.StepValues(log, "cpu", "last.pt", "")
for step in range(3):
    values.add(step, {{"train_loss": torch.tensor(step + 10.0 * rank), "lr": 0.5}})
values.flush()
torch.distributed.barrier()
with util.main_process_alone(rank == 0):
    log.close()
    series = read_log({log!r})
    print("logged", series["train_loss"][1].tolist(), series["lr"][1].tolist())
"""


def test_torchrun_logs_the_mean_over_processes_of_each_step(tmp_path):
    """The loss DDP optimises is the mean of the processes' batch losses: the log holds it, not
    the main process's share alone (plain numbers such as the learning rate stay as they are)."""
    source = PROCESS_LOSSES.replace("{log!r}", repr(str(tmp_path / "run.log")))
    result = run_two_cpu_processes(tmp_path / "losses.py", source)
    assert "logged [5.0, 6.0, 7.0] [0.5, 0.5, 0.5]" in result.stdout


def test_more_torchrun_processes_than_gpus_is_a_clear_error(monkeypatch):
    """A one-GPU machine asked for two processes: rank 1 would die with "invalid device ordinal"."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name, value in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1", "RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(util.UserError, match="torchrun started 2 processes on this machine but it has 1 GPU.*"
                                             "--nproc_per_node=1.*CUDA_VISIBLE_DEVICES= torchrun"):
        util.setup_distributed()
