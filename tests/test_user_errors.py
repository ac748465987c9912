"""Expected user mistakes stop with one clear sentence and no traceback, and shape constants are
checked, with the rule they break, before any tensor meets them."""
import os
import subprocess
import sys

import pytest
import torch

import dataset
import model_diffusion
import model_discriminator
import model_prior
import model_VAE
import pre_train
import stable_diffusion
import train_viT
import util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_STAGE_CONFIG = dict({name: getattr(pre_train, name) for name in util.config_names(vars(pre_train))},
                          BASE_CHANNELS=32, CHANNEL_MULTS=(1, 2))   # two levels: per-level rules have levels to count
PRIOR_CONFIG = {name: getattr(train_viT, name) for name in util.config_names(vars(train_viT))}
DIFFUSION_CONFIG = {name: getattr(stable_diffusion, name) for name in util.config_names(vars(stable_diffusion))}


def run_script(script, *argv, cwd=ROOT):
    """Run a script as a user would; returns (exit status, stdout, stderr)."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=cwd,
                            capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout, result.stderr


def assert_one_sentence(returncode, stderr, *fragments):
    """Exit status 1, no traceback, one line of stderr holding every fragment."""
    assert returncode == 1, stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


# ----------------------------------------------------------------------------- scripts, as a user runs them
def test_img_size_that_the_encoder_cannot_divide_names_the_rule(tmp_path):
    # a missing DATA_DIR too: the shape check must come before any data is read
    returncode, _, stderr = run_script("pre_train.py", "--IMG_SIZE=50", "--CHANNEL_MULTS=(1, 2)",
                                       f"--DATA_DIR={tmp_path}/none", f"--CKPT_DIR={tmp_path}")
    assert_one_sentence(returncode, stderr, "IMG_SIZE must be a multiple of PATCH_SIZE x 2^(len(CHANNEL_MULTS) - 1)"
                        " = 2 x 2^1 = 4", "e.g. 48 or 52; got 50")


def test_value_of_the_wrong_type_names_the_type_and_an_example_without_parser_internals(tmp_path):
    returncode, _, stderr = run_script("pre_train.py", "--EPOCHS=ten", f"--CKPT_DIR={tmp_path}")
    assert_one_sentence(returncode, stderr, "EPOCHS must be an integer, e.g. --EPOCHS=14 (its default); got 'ten'")
    assert "ast" not in stderr and "malformed" not in stderr
    returncode, _, stderr = run_script("pre_train.py", "--USE_BF16=yes", f"--CKPT_DIR={tmp_path}")
    assert_one_sentence(returncode, stderr, "USE_BF16 must be None (where the CPU has bf16 instructions), True or "
                                            "False, got 'yes'")


def test_res_blocks_take_a_tuple_per_level_from_the_command_line(tmp_path):
    # the encoder's tuple is accepted; the decoder's has one count too many for two levels
    returncode, _, stderr = run_script("pre_train.py", "--CHANNEL_MULTS=(1, 2)", "--ENCODER_RES_BLOCKS=(1, 2)",
                                       "--DECODER_RES_BLOCKS=(1, 2, 3)", f"--DATA_DIR={tmp_path}/none")
    assert_one_sentence(returncode, stderr, "DECODER_RES_BLOCKS must be an integer >= 0 or a tuple of one per level "
                        "(2, as in CHANNEL_MULTS), e.g. (1, 1); got (1, 2, 3)")


@pytest.mark.parametrize("script, argv, message", [
    ("dataset.py", ["--IMG_SIZE=0", "--DATA_DIR=none"], "IMG_SIZE must be a positive integer, got 0"),
    ("dataset.py", ["--DEMO_BRAINS=(48, 8)"], "DEMO_BRAINS must be three positive integers (train, validate, test), "
     "got (48, 8)"),
    ("dataset.py", ["--DEMO_SEED=-1"], "DEMO_SEED must be a non-negative integer, got -1"),
    ("score_scans.py", ["--SPLIT=all", "--DATA_DIR=none"], "SPLIT must be one of train, validate, test, got 'all'"),
    ("latent_dataset.py", ["--BATCH_SIZE=0"], "BATCH_SIZE must be a positive integer, got 0"),
    ("pre_train.py", ["--TRAIN_SPLIT=test", "--DATA_DIR=none"],
     "TRAIN_SPLIT must be one of train, train_and_validate, got 'test'"),
    ("pre_train.py", ["--DETAIL_WEIGHT=-0.5"], "DETAIL_WEIGHT must be >= 0 (0 = no detail-energy loss), got -0.5"),
    ("train_viT.py", ["--EPOCHS=-1"], "EPOCHS must be a positive integer, got -1"),
    ("stable_diffusion.py", ["--LOSS=MSE"], "LOSS must be 'mse' or 'l1', got 'MSE'"),   # once silently L1
    ("stable_diffusion.py", ["--Z_DROP=0.0"], "GUIDANCE_SCALES (1.0, 2.0, 3.0) need an unconditional branch: "
     "Z_CONDITIONING=True and Z_DROP > 0"),
    ("stable_diffusion.py", ["--SNAP_TEMPERATURES=(1.0, -1.0)"],
     "SNAP_TEMPERATURES must hold temperatures >= 0 (0 = nearest code), got (1.0, -1.0)"),
])
def test_training_constants_are_checked_before_anything_is_read(tmp_path, script, argv, message):
    # run in an empty folder: no data, checkpoint or latents to read before the check
    returncode, _, stderr = run_script(script, *argv, cwd=tmp_path)
    assert_one_sentence(returncode, stderr, message)


def test_missing_config_file_and_unknown_constant(tmp_path):
    returncode, _, stderr = run_script("train_viT.py", "config/no_such_preset.py")
    assert_one_sentence(returncode, stderr, "config file config/no_such_preset.py does not exist")
    returncode, _, stderr = run_script("stable_diffusion.py", "--EPOCH=3")
    assert_one_sentence(returncode, stderr, "unknown constant 'EPOCH'")


def test_help_lists_the_settings_as_a_preset_leaves_them_and_runs_nothing(tmp_path):
    returncode, stdout, stderr = run_script("pre_train.py", os.path.join(ROOT, "config", "pre_train_vae.py"), "--help",
                                            cwd=tmp_path)
    assert returncode == 0 and stderr == ""
    assert "First stage: train a VQVAE-GAN or VAE-GAN" in stdout
    for line in ("MODE = 'VAE'", "EPOCHS = 10", "GAN_START_STEP = 672", "BATCH_SIZE = 16"):
        assert any(row.startswith(line + " ") or row == line for row in stdout.splitlines()), line
    assert "SHAPE_KEYS" not in stdout and "NUM_Z" not in stdout
    assert os.listdir(tmp_path) == []
    returncode, _, stderr = run_script("pre_train.py", "--NUM_Z=16", cwd=tmp_path)
    assert_one_sentence(returncode, stderr, "unknown constant 'NUM_Z'")


@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_help_into_a_reader_that_stopped_ends_quietly(unbuffered):
    read_end, write_end = os.pipe()
    os.close(read_end)          # as `--help | head` once head has its lines: every write meets a closed pipe
    env = dict(os.environ, PYTHONUNBUFFERED=unbuffered)     # "": stdout buffered, as in most shells
    result = subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"), "--help"], stdout=write_end,
                            stderr=subprocess.PIPE, text=True, timeout=120, env=env)
    os.close(write_end)
    assert (result.returncode, result.stderr) == (0, "")


def test_missing_first_stage_checkpoint_says_which_command_makes_it(tmp_path):
    returncode, _, stderr = run_script("latent_dataset.py", "--FIRST_STAGE=vae", f"--CKPT_DIR={tmp_path}")
    assert_one_sentence(returncode, stderr, f"first-stage checkpoint {tmp_path}/vae_best.pt does not exist; "
                        "train it first (python pre_train.py --MODE=VAE)")


@pytest.mark.parametrize("script", ["train_viT.py", "stable_diffusion.py", "predict.py"])
def test_missing_latents_say_which_command_makes_them(tmp_path, script):
    returncode, _, stderr = run_script(script, f"--LATENT_DIR={tmp_path}", f"--CKPT_DIR={tmp_path}")
    assert_one_sentence(returncode, stderr, f"collected latents {tmp_path}/vqvae_", "do not exist; run python "
                        "latent_dataset.py --FIRST_STAGE=vqvae first")


def test_missing_data_folder(tmp_path):
    returncode, _, stderr = run_script("dataset.py", f"--DATA_DIR={tmp_path}/nowhere")
    assert returncode == 1 and "Traceback" not in stderr
    assert stderr.startswith(f"DATA_DIR {tmp_path}/nowhere does not exist;\nexpected the OASIS 2-D slice layout")
    (tmp_path / "scan.nii.gz").write_bytes(b"")
    returncode, _, stderr = run_script("dataset.py", f"--DATA_DIR={tmp_path}/scan.nii.gz")
    assert returncode == 1 and "Traceback" not in stderr
    assert stderr.startswith(f"DATA_DIR {tmp_path}/scan.nii.gz is a file, not a folder of slices; NIfTI volumes "
                             f"convert to one with python dataset.py --NIFTI_FILES={tmp_path}/scan.nii.gz")
    (tmp_path / "keras_png_slices_data.zip").write_bytes(b"")     # OASIS's slices as downloaded: not NIfTI
    with pytest.raises(util.UserError, match="keras_png_slices_data.zip is a file, not a folder of slices; an archive "
                                             r"\(OASIS's slices come as keras_png_slices_data.zip\) is unpacked first"):
        dataset.resolve_data_dir(str(tmp_path / "keras_png_slices_data.zip"))


def test_smoothing_window_of_zero(tmp_path):
    returncode, _, stderr = run_script("logger.py", "--SMOOTHING=0", cwd=tmp_path)
    assert_one_sentence(returncode, stderr, "SMOOTHING must be a positive integer, got 0")


def test_checkpoint_from_another_config_is_refused_without_traceback(demo_dir, tmp_path):
    tiny = ["--IMG_SIZE=32", "--BASE_CHANNELS=16", "--CHANNEL_MULTS=(1, 2)", "--NUM_CODES=32", "--CODE_DIM=4", "--DISC_CHANNELS=8",
            "--BATCH_SIZE=8", f"--DATA_DIR={demo_dir}", f"--CKPT_DIR={tmp_path}"]
    config = dict(FIRST_STAGE_CONFIG, IMG_SIZE=32, BASE_CHANNELS=8, NUM_CODES=32, CODE_DIM=4, DISC_CHANNELS=8)
    util.save_checkpoint({"config": config}, str(tmp_path / "vqvae_last.pt"))
    returncode, _, stderr = run_script("pre_train.py", *tiny, cwd=tmp_path)
    assert returncode == 1 and "Traceback" not in stderr
    assert stderr.strip().splitlines() == [
        f"checkpoint {tmp_path}/vqvae_last.pt was made with another config, so its tensor shapes do not fit "
        "this script's model:", "  BASE_CHANNELS: checkpoint 8, script 16",
        "Use the same settings, or point the script elsewhere."]


def test_checkpoint_from_an_older_model_version_names_the_file(tmp_path):
    """A prior saved before z was added at every position has no z_condition weights: loading it
    names the file and the fix instead of printing load_state_dict's traceback."""
    args = model_prior.prior_args(dict(PRIOR_CONFIG, N_EMBD=16, N_HEAD=2, N_LAYER=1), 8, (4, 4))
    state = model_prior.CodePrior(**args).state_dict()
    del state["z_condition.weight"]
    path = str(tmp_path / "vqvae_prior_best.pt")
    util.save_checkpoint({"model_args": args, "model": state}, path)
    with pytest.raises(util.UserError, match=rf"checkpoint {path} does not fit this code's CodePrior \(Error\(s\) in "
                                             r"loading state_dict for CodePrior:\); it was made by another version of "
                                             r"the model: train it again"):
        model_prior.load_prior(path, "cpu")


# ----------------------------------------------------------------------------- shape rules where models are built
@pytest.mark.parametrize("changes, message", [
    ({"IMG_SIZE": 50}, r"IMG_SIZE must be a multiple of .* = 4, .* e.g. 48 or 52; got 50"),
    ({"IMG_SIZE": 60, "PATCH_SIZE": 1, "CHANNEL_MULTS": (1, 2, 2, 4)}, r"= 1 x 2\^3 = 8, .* e.g. 56 or 64; got 60"),
    ({"IMG_SIZE": 2}, "e.g. 4; got 2"),
    ({"CHANNEL_MULTS": ()}, "CHANNEL_MULTS must be a non-empty tuple of positive integers"),
    ({"CHANNEL_MULTS": (1, 0)}, "CHANNEL_MULTS must be .*; got \\(1, 0\\)"),
    ({"ENCODER_RES_BLOCKS": (2, 2, 2)}, r"ENCODER_RES_BLOCKS must be .* one per level \(2, as in CHANNEL_MULTS\)"),
    ({"DECODER_RES_BLOCKS": -1}, "DECODER_RES_BLOCKS must be an integer >= 0"),
    ({"MODE": "vqvae"}, "MODE must be 'VQVAE' or 'VAE', got 'vqvae'"),
    ({"BASE_CHANNELS": 0}, "BASE_CHANNELS must be a positive integer, got 0"),
])
def test_first_stage_shape_rules(changes, message):
    with pytest.raises(util.UserError, match=message):
        model_VAE.build_model(dict(FIRST_STAGE_CONFIG, **changes))


def test_first_stage_shapes_that_follow_the_rules_build_and_run():
    config = dict(FIRST_STAGE_CONFIG, IMG_SIZE=48, BASE_CHANNELS=8, ENCODER_RES_BLOCKS=(0, 2), DECODER_RES_BLOCKS=(1, 0))
    model = model_VAE.build_model(config)
    images = torch.zeros(2, 1, 48, 48)
    reconstruction, _, indices = model(images, torch.tensor([0, 31]))
    assert reconstruction.shape == images.shape and indices.shape == (2, 12, 12)
    discriminator = model_discriminator.build_discriminator(dict(config, IMG_SIZE=12, DISC_LAYERS=2))
    assert discriminator(torch.zeros(2, 1, 12, 12), torch.tensor([0, 31])).shape == (2, 1, 1, 1)


def test_discriminator_needs_three_pixels_after_its_downsamplings():
    with pytest.raises(util.UserError, match="IMG_SIZE must be at least 3 x 2\\^DISC_LAYERS = 24 .* got 16"):
        model_discriminator.build_discriminator(dict(FIRST_STAGE_CONFIG, IMG_SIZE=16, DISC_LAYERS=3))


def test_prior_rules():
    args = model_prior.prior_args(dict(PRIOR_CONFIG, N_EMBD=48, N_HEAD=6), 32, (4, 4))
    prior = model_prior.CodePrior(**args)
    assert prior(torch.zeros(2, 4, 4, dtype=torch.long), torch.tensor([0, 1])).shape == (2, 16, 32)
    for changes, message in [({"N_EMBD": 50, "N_HEAD": 4}, "N_EMBD must be divisible by N_HEAD .* e.g. N_EMBD=48 for "
                                                           "N_HEAD=4; got N_EMBD=50"),
                             ({"N_HEAD": 0}, "N_HEAD must be a positive integer"),
                             ({"DROPOUT": 1.0}, r"DROPOUT must be in \[0, 1\)"),
                             ({"TEMPERATURES": (1.0, 0.0)}, "TEMPERATURES must hold temperatures above 0"),
                             ({"TOP_PS": (1.0, 0.0)}, r"TOP_PS must hold nucleus masses in \(0, 1\] .* got \(1.0, 0.0\)"),
                             ({"Z_DROP": 1.0}, r"Z_DROP must be in \[0, 1\) .* got 1.0"),
                             ({"GUIDANCE_SCALES": (1.0, -1.0)}, r"GUIDANCE_SCALES must hold scales >= 0"),
                             ({"Z_DROP": 0.0}, r"GUIDANCE_SCALES \(1.0, 2.0\) need an unconditional "
                                                 r"branch: Z_DROP > 0"),
                             ({"PATCH_SIZE": 3}, "PATCH_SIZE=3 must divide the first stage's code grid, 4x4")]:
        with pytest.raises(util.UserError, match=message):
            model_prior.prior_args(dict(PRIOR_CONFIG, **changes), 32, (4, 4))


def test_diffusion_rules():
    # 12x12 latents: two halvings fit (12 -> 6 -> 3), a third does not
    args = model_diffusion.unet_args(dict(DIFFUSION_CONFIG, PATCH_SIZE=1, CHANNEL_MULTS=(1, 2, 2)), (4, 12, 12))
    unet = model_diffusion.LatentUNet(**args)
    assert unet(torch.zeros(1, 4, 12, 12), torch.tensor([5]), torch.tensor([3])).shape == (1, 4, 12, 12)
    with pytest.raises(util.UserError, match=r"CHANNEL_MULTS has 4 levels, .* multiple of PATCH_SIZE \* "
                                             r"2\^\(len\(CHANNEL_MULTS\) - 1\) = 8; the first stage's are 12x12: "
                                             r"use at most 3 levels, e.g. \(1, 2, 2\)"):
        model_diffusion.unet_args(dict(DIFFUSION_CONFIG, PATCH_SIZE=1, CHANNEL_MULTS=(1, 2, 2, 2)), (4, 12, 12))
    # patches of 2 leave 6x6: one halving fits, a second does not; patches of 5 do not tile 12x12
    args = model_diffusion.unet_args(dict(DIFFUSION_CONFIG, PATCH_SIZE=2, CHANNEL_MULTS=(1, 2)), (4, 12, 12))
    unet = model_diffusion.LatentUNet(**args)
    assert unet(torch.zeros(1, 4, 12, 12), torch.tensor([5]), torch.tensor([3])).shape == (1, 4, 12, 12)
    with pytest.raises(util.UserError, match=r"= 8; the first stage's are 12x12: use at most 2 levels, e.g. \(1, 2\)"):
        model_diffusion.unet_args(dict(DIFFUSION_CONFIG, PATCH_SIZE=2, CHANNEL_MULTS=(1, 2, 2)), (4, 12, 12))
    with pytest.raises(util.UserError, match="PATCH_SIZE=5 must divide the first stage's latent grid, 12x12"):
        model_diffusion.unet_args(dict(DIFFUSION_CONFIG, PATCH_SIZE=5), (4, 12, 12))
    # the full-resolution head: only on folded latents, whose first level must unfold evenly
    assert args["head_channels"] == DIFFUSION_CONFIG["HEAD_CHANNELS"] > 0 and unet.head is not None
    assert model_diffusion.unet_args(dict(DIFFUSION_CONFIG, PATCH_SIZE=1), (4, 12, 12))["head_channels"] == 0
    with pytest.raises(util.UserError, match="HEAD_CHANNELS must be an integer >= 0"):
        model_diffusion.unet_args(dict(DIFFUSION_CONFIG, PATCH_SIZE=2, HEAD_CHANNELS=-1), (4, 12, 12))
    with pytest.raises(util.UserError, match=r"BASE_CHANNELS \* CHANNEL_MULTS\[0\] = 18 channels, into "
                                             r"PATCH_SIZE\^2 = 4 places: make it a multiple of 4, or HEAD_CHANNELS=0"):
        model_diffusion.unet_args(dict(DIFFUSION_CONFIG, PATCH_SIZE=2, BASE_CHANNELS=18), (4, 12, 12))
    for changes, message in [({"BETA_START": 0.03}, "0 < BETA_START < BETA_END < 1"),
                             ({"PREDICTION": "x0"}, "PREDICTION must be 'v' or 'eps', got 'x0'"),
                             ({"NUM_TIMESTEPS": 0}, "NUM_TIMESTEPS must be a positive integer")]:
        with pytest.raises(util.UserError, match=message):
            model_diffusion.build_diffusion(dict(DIFFUSION_CONFIG, **changes))


def test_a_batch_size_with_no_full_batch_is_named():
    data = torch.utils.data.TensorDataset(torch.zeros(10, 3))
    assert len(util.make_loader(data, 10, shuffle=True, drop_last=True)) == 1
    with pytest.raises(util.UserError, match="BATCH_SIZE 11 .* leaves no full batch: 10 training items"):
        util.make_loader(data, 11, shuffle=True, drop_last=True)


@pytest.mark.parametrize("script", ["dataset.py", "train_critic.py", "latent_dataset.py", "predict.py", "score_scans.py",
                                    "logger.py"])
def test_a_one_process_script_under_torchrun_says_so(tmp_path, script):
    """Started as one of several torchrun processes (WORLD_SIZE), a script that works in one
    process stops before any work (even building the demo brains) instead of doing it all once
    per process."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, script)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0"))
    assert_one_sentence(result.returncode, result.stderr, f"{script} runs in one process, and torchrun started 2: "
                                                          f"run it with python")
    assert os.listdir(tmp_path) == []


def test_torchrun_of_a_one_process_script_stops_with_the_sentence(tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                             os.path.join(ROOT, "predict.py")], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""))
    assert result.returncode != 0
    assert "predict.py runs in one process, and torchrun started 2: run it with python" in result.stderr
