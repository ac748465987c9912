"""Second stage: the transformer prior, the latent diffusion, and the scripts end to end on a tiny
VQVAE trained on real demo brains (2 train brains at 32x32)."""
import json
import math
import os
import pathlib
import runpy
import shutil
import subprocess
import sys

import imageio.v3 as iio
import nibabel
import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

import dataset
import util
from conftest import assert_within_eager_spread
from logger import read_log
from model_diffusion import GaussianDiffusion, LatentUNet, diffusion_latents, load_diffusion
from realism import METRICS
from model_prior import CodePrior, load_prior, nats_per_code
from model_VAE import load_first_stage
from module import NULL_Z, hide_z
from train_viT import histogram_baseline
from test_dataset import write_small_volume

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FIRST_STAGE = ["--IMG_SIZE=32", "--BASE_CHANNELS=16", "--CHANNEL_MULTS=(1, 2)", "--PATCH_SIZE=2",
                    "--NUM_CODES=32", "--CODE_DIM=4", "--LATENT_CHANNELS=4", "--DISC_CHANNELS=8",
                    "--DISC_LAYERS=2", "--BATCH_SIZE=8", "--GAN_START_STEP=8", "--LR=1e-3", "--EPOCHS=2",
                    "--DETAIL_WEIGHT=0.0",   # off, as in test_pre_train.py's tiny runs: it held their L1 back
                    "--USE_BF16=False"]   # fp32 on every CPU, so the margins below hold on every machine
# the VQVAE trains long enough (test SSIM 0.84) for its codes to hold structure a prior can learn
LEARNED_VQVAE = ["--EPOCHS=8", "--BATCH_SIZE=4", "--LR=3e-3", "--GAN_START_STEP=112"]
# 4 + 8 + 16 = 28 features, fewer than the 32 slices of the one test brain: a Frechet distance
TINY_CRITIC = ["--IMG_SIZE=32", "--EPOCHS=2", "--CHANNELS=(4, 8, 16)", "--BATCH_SIZE=16"]
TINY_PREDICT = ["--VOLUMES=2", "--TSNE_POINTS=64", "--DDPM_STEPS=100"]
# a code a position on the tiny 8x8 grid, for which the margins below were set (the defaults' 2x2
# patches run in test_torchrun_two_processes and in the models' own tests)
TINY_PRIOR = ["--N_LAYER=2", "--N_HEAD=2", "--N_EMBD=32", "--BATCH_SIZE=8", "--DROPOUT=0.0", "--LR=3e-3",
              "--SWEEP_VOLUMES=2", "--TEMPERATURES=(1.0,)", "--TOP_PS=(1.0, 0.9)", "--GUIDANCE_SCALES=(1.0, 2.0)",
              "--PATCH_SIZE=1", "--USE_BF16=False"]     # fp32, as TINY_FIRST_STAGE
TINY_DIFFUSION = ["--BASE_CHANNELS=16", "--BATCH_SIZE=16", "--SAMPLE_STEPS=4", "--LR=2e-3", "--EMA_DECAY=0.5",
                  "--SWEEP_VOLUMES=2", "--PATCH_SIZE=1", "--USE_BF16=False"]


def default_precision(arguments):
    """arguments without --USE_BF16: bf16 autocast where the scripts' default puts it."""
    return [argument for argument in arguments if not argument.startswith("--USE_BF16")]


def assert_bf16_by_default(summary_path):
    """Trained with default precision: bf16 autocast exactly on a CPU with bf16 instructions."""
    summary = json.loads(summary_path.read_text())
    assert summary["bf16_autocast"] == (util.get_device().type == "cpu" and util.cpu_has_bf16())


# runs whose CKPT_DIR holds no brain critic sample with one setting, which needs no search on validate
NO_SEARCH = {"train_viT.py": ["--TEMPERATURES=(1.0,)", "--TOP_PS=(1.0,)", "--GUIDANCE_SCALES=(1.0,)"],
             "stable_diffusion.py": ["--GUIDANCE_SCALES=(1.0,)", "--SNAP_TEMPERATURES=(0.0,)"]}


def run_script(name, argv):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [name] + argv)
        runpy.run_path(os.path.join(ROOT, name), run_name="__main__")


def folders(out_dir):
    return [f"--CKPT_DIR={out_dir}/ckpt", f"--LOG_DIR={out_dir}/log", f"--VISUALIZE_DIR={out_dir}/visualize"]


@pytest.fixture(scope="module")
def first_stage_dir(demo_dir, tmp_path_factory):
    """A tiny VQVAE trained for 8 epochs and a VAE trained for 2, with their latents collected,
    and a tiny critic. Trained on the CPU on every machine (the second-stage tests then train on
    the GPU where there is one): the learning tests' margins hold for these codes, and a GPU's
    other arithmetic would give other ones."""
    out_dir = tmp_path_factory.mktemp("pipeline")
    with pytest.MonkeyPatch.context() as cpu_only:
        cpu_only.setattr(torch.cuda, "is_available", lambda: False)
        for mode in ("VQVAE", "VAE"):
            run_script("pre_train.py", TINY_FIRST_STAGE + folders(out_dir)
                       + [f"--MODE={mode}", f"--DATA_DIR={demo_dir}"] + (LEARNED_VQVAE if mode == "VQVAE" else []))
            run_script("latent_dataset.py", [f"--FIRST_STAGE={mode.lower()}", f"--CKPT_DIR={out_dir}/ckpt",
                                             f"--LATENT_DIR={out_dir}/latents"])
        run_script("train_critic.py", TINY_CRITIC + [f"--DATA_DIR={demo_dir}", f"--CKPT_DIR={out_dir}/ckpt",
                                                     f"--LOG_DIR={out_dir}/log"])
    return out_dir


def second_stage_args(out_dir, *extra):
    return folders(out_dir) + [f"--LATENT_DIR={out_dir}/latents", *extra]


def per_z_average_ssim(demo_dir, split):
    """SSIM of the best a decoder that ignores its latent can do: each slice of `split`
    "reconstructed" as the average train slice of its z."""
    train, scored = dataset.OasisSlices("train", demo_dir, 32), dataset.OasisSlices(split, demo_dir, 32)
    train_images = torch.stack([train[i][0] for i in range(len(train))])
    average = torch.stack([train_images[train.zs == z].mean(0) for z in range(dataset.SLICES_PER_BRAIN)])
    images = torch.stack([scored[i][0] for i in range(len(scored))])
    return util.reconstruction_ssim(images, average[scored.zs]).mean().item()


# ----------------------------------------------------------------------------- what the models learn
def test_first_stage_beats_the_per_z_average_slice(first_stage_dir, demo_dir):
    """A decoder that ignores its latent reaches at best the average train slice of each z: SSIM
    0.62 on validate and 0.78 on test here (such a VQVAE scored 0.59 / 0.72, the intact one 0.75 / 0.84)."""
    summary = json.loads((first_stage_dir / "log" / "vqvae_summary.json").read_text())
    assert summary["best_val_ssim"] > per_z_average_ssim(demo_dir, "validate") + 0.05
    assert summary["test_ssim"] > per_z_average_ssim(demo_dir, "test") + 0.02


# ----------------------------------------------------------------------------- transformer prior
def tiny_prior(grid_shape=(3, 4), **kwargs):
    torch.manual_seed(0)
    return CodePrior(num_codes=11, grid_shape=grid_shape, num_z_positions=32, num_layers=2, num_heads=2, dim=16,
                     dropout=0.0, **kwargs).eval()


def test_prior_logits_depend_only_on_earlier_codes_and_z():
    prior = tiny_prior()
    codes = torch.randint(0, 11, (2, 3, 4))
    z = torch.tensor([3, 17])
    logits = prior(codes, z)
    changed = codes.clone()
    changed[:, 1, 2] = (changed[:, 1, 2] + 1) % 11        # raster position 6
    logits_changed = prior(changed, z)
    assert torch.allclose(logits[:, :7], logits_changed[:, :7], atol=1e-6)   # position 6 is predicted, not seen
    assert not torch.allclose(logits[:, 7:], logits_changed[:, 7:], atol=1e-4)
    assert not torch.allclose(logits[:, 0], prior(codes, torch.tensor([4, 18]))[:, 0], atol=1e-4)
    # a prefix of the grid (what the sampler without a KV cache reads) gives the same logits
    assert torch.allclose(prior._patch_logits(codes.flatten(1)[:, :5, None], z)[:, :, 0], logits[:, :5], atol=1e-6)


def test_patch_prior_reads_codes_in_patch_order():
    """With 2x2 patches on a 4x6 grid, a code's logits must change with every code before it in
    patch order (earlier patches, then earlier places in its own patch) and with nothing else."""
    prior = tiny_prior(grid_shape=(4, 6), patch_size=2)
    codes, z = torch.randint(0, 11, (2, 4, 6)), torch.tensor([3, 17])
    logits = prior(codes, z)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(6), indexing="ij")
    order = ((rows // 2 * 3 + cols // 2) * 4 + rows % 2 * 2 + cols % 2).flatten()     # patch order of each raster code
    for code in range(24):
        changed = codes.clone().flatten(1)
        changed[:, code] = (changed[:, code] + 1) % 11
        moved = (prior(changed.view_as(codes), z) - logits).abs().amax((0, 2)) > 1e-6
        assert torch.equal(moved, order > order[code]), code


@pytest.mark.parametrize("grid_shape, patch_size", [((3, 4), 1), ((4, 6), 2)])
def test_training_loss_is_each_codes_negative_log_likelihood(grid_shape, patch_size):
    """The loss train_viT.py minimises (taken in patch order) is the mean over every code of
    -log p(code) read off the raster-order logits at that code's place."""
    prior = tiny_prior(grid_shape, patch_size=patch_size)
    codes, z = torch.randint(0, 11, (2,) + grid_shape), torch.tensor([3, 17])
    log_probs = prior(codes, z).log_softmax(-1)
    reference = -sum(log_probs[b, i, codes[b].flatten()[i]] for b in range(2) for i in range(codes[0].numel()))
    assert prior(codes, z, return_nats_per_code=True).item() == pytest.approx(reference.item() / codes.numel(),
                                                                             abs=1e-6)


@pytest.mark.parametrize("grid_shape, patch_size, guidance", [((3, 4), 1, 1.0), ((4, 6), 2, 1.0), ((4, 6), 2, 2.5)])
def test_cached_sampling_follows_the_full_forward_pass(grid_shape, patch_size, guidance):
    """Sampling with the KV cache must draw what full forward passes over the codes drawn so
    far draw from the same random stream, guided or not."""
    prior = tiny_prior(grid_shape, patch_size=patch_size)
    z = torch.tensor([0, 5, 31])
    torch.manual_seed(1)
    drawn = prior.sample(z, temperature=1.0, guidance=guidance)
    assert drawn.shape == (3,) + grid_shape and drawn.dtype == torch.long
    torch.manual_seed(1)
    assert torch.equal(drawn, prior.sample(z, temperature=1.0, guidance=guidance, use_cache=False))


@pytest.mark.parametrize("temperature, top_p", [(0.1, 1.0), (0.2, 0.5)])
def test_sampled_first_codes_follow_the_softmax_of_their_logits(temperature, top_p):
    """The sampler's Gumbel-max draws are draws from softmax(logits / temperature), cut to the
    nucleus of top_p: over 6000 grids, the first code's frequencies match those probabilities,
    read off a plain forward pass (the first code depends on z alone) and cut here in numpy. The
    low temperatures spread the untrained prior's near-uniform law (0.08-0.11 at temperature 1) to
    0.01-0.28; at 0.2 the nucleus of 0.5 holds 4 of the 11 codes."""
    prior = tiny_prior()
    z = torch.full((6000,), 5)
    torch.manual_seed(2)
    drawn = prior.sample(z, temperature=temperature, top_p=top_p)
    expected = (prior(drawn[:1], z[:1])[0, 0] / temperature).softmax(-1).double().detach().numpy()
    order = np.argsort(-expected)
    kept = order[:np.searchsorted(np.cumsum(expected[order]), top_p) + 1]     # the fewest holding top_p
    expected = np.where(np.isin(np.arange(11), kept), expected, 0)
    expected = torch.from_numpy(expected / expected.sum()).float()
    assert len(kept) == (11 if top_p == 1.0 else 4)
    frequencies = torch.bincount(drawn[:, 0, 0], minlength=11) / len(z)
    assert (frequencies[expected == 0] == 0).all()
    assert torch.allclose(frequencies, expected, atol=4 * (0.25 / len(z)) ** 0.5)     # 4 standard errors at most


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_slices_of_a_volume_share_their_sampling_noise(guidance):
    """With noise_groups = 2 the batch is 2 volumes of 3 slices; slices that share noise and are
    asked for the same z draw the same grid, the two volumes differ, and without groups every
    slice is drawn on its own."""
    prior = tiny_prior()
    z = torch.full((6,), 9)
    torch.manual_seed(3)
    volumes = prior.sample(z, guidance=guidance, noise_groups=2)
    assert torch.equal(volumes[0], volumes[1]) and torch.equal(volumes[0], volumes[2])
    assert torch.equal(volumes[3], volumes[4]) and torch.equal(volumes[3], volumes[5])
    assert not torch.equal(volumes[0], volumes[3])
    torch.manual_seed(3)
    independent = prior.sample(z, guidance=guidance)
    assert len({tuple(grid.flatten().tolist()) for grid in independent}) == 6


def test_histogram_baseline_smooths_with_the_pseudo_count_best_on_validate():
    """One position, 3 codes seen (3, 1, 0) times in train. A validate split full of the unseen
    code wants the most smoothing of the grid (1.0), one like train the least (1e-3); test is
    then scored with that choice."""
    train, test = torch.tensor([0, 0, 0, 1]).view(4, 1, 1), torch.tensor([0]).view(1, 1, 1)
    nats, pseudo_count = histogram_baseline(train, torch.tensor([2, 2, 0]).view(3, 1, 1), test, 3)
    assert pseudo_count == 1.0 and nats == pytest.approx(-math.log((3 + 1) / (4 + 3)))
    nats, pseudo_count = histogram_baseline(train, train, test, 3)
    assert pseudo_count == 1e-3 and nats == pytest.approx(-math.log((3 + 1e-3) / (4 + 3e-3)))


@pytest.mark.parametrize("grid_shape, patch_size", [((3, 4), 1), ((4, 6), 2)])
def test_a_tiny_nucleus_is_greedy(grid_shape, patch_size):
    """Greedy draws (a nucleus of 1e-6 holds the likeliest code alone) are the argmax of the
    forward pass's logits: the sampler fills the grid in the order and layout that training reads."""
    prior = tiny_prior(grid_shape, patch_size=patch_size)
    z = torch.tensor([2, 9])
    greedy = prior.sample(z, top_p=1e-6)
    logits = prior(greedy, z)
    assert torch.equal(logits.argmax(-1), greedy.flatten(1))


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_guided_greedy_draws_follow_the_guidance_formula(guidance):
    """Guided greedy draws are the argmax of u + w (c - u), with c the forward pass's logits
    given z and u those given NULL_Z (no z: the start token and every position's z term are
    zero); w = 0 is the unconditional model, which draws the same grid whatever z is asked for."""
    prior = tiny_prior((4, 6), patch_size=2)
    z = torch.tensor([2, 9])
    greedy = prior.sample(z, top_p=1e-6, guidance=guidance)
    conditional, unconditional = prior(greedy, z), prior(greedy, torch.full_like(z, NULL_Z))
    assert not torch.allclose(conditional, unconditional, atol=1e-4)      # z matters to this prior
    guided = unconditional + guidance * (conditional - unconditional)
    assert torch.equal(guided.argmax(-1), greedy.flatten(1))
    if guidance == 0.0:
        assert torch.equal(greedy[0], greedy[1])


# ----------------------------------------------------------------------------- diffusion
def test_unet_shapes_zero_start_and_z_effect():
    torch.manual_seed(0)
    unet = LatentUNet(in_channels=4, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, num_timesteps=100)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 90])
    assert torch.equal(unet(x, t, torch.tensor([0, 1])), torch.zeros(2, 4, 8, 8))   # zero-initialised output
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
    out = unet(x, t, torch.tensor([0, 1]))
    assert out.shape == x.shape
    assert not torch.allclose(out, unet(x, t, torch.tensor([7, 20])), atol=1e-5)
    assert not torch.allclose(out, unet(x, torch.tensor([50, 40]), torch.tensor([0, 1])), atol=1e-5)


def test_full_resolution_head_starts_silent_and_learns():
    """A folded U-Net's head adds nothing until trained (the U-Net starts as the folded one), then
    its weights move and it changes the prediction."""
    torch.manual_seed(0)
    unet = LatentUNet(in_channels=4, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, num_timesteps=100,
                      patch_size=2, head_channels=8)
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
    x, t, z = torch.randn(4, 4, 8, 8), torch.tensor([5, 30, 60, 90]), torch.tensor([0, 1, 2, 3])
    head, unet.head = unet.head, None
    folded_only = unet(x, t, z)
    unet.head = head
    assert torch.equal(unet(x, t, z), folded_only)
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        GaussianDiffusion(100).loss(unet, x, z).backward()
        optimizer.step()
    assert unet.head.conv_out.weight.abs().sum() > 0
    with torch.no_grad():
        with_head = unet(x, t, z)
        unet.head = None
        assert (with_head - unet(x, t, z)).abs().mean() > 1e-3 * with_head.abs().mean()


def test_null_z_drops_the_condition_and_guidance_extrapolates_from_it():
    torch.manual_seed(0)
    unet = LatentUNet(in_channels=4, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, num_timesteps=100)
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
    x, t, z = torch.randn(2, 4, 8, 8), torch.tensor([5, 90]), torch.tensor([3, 17])
    null = torch.full_like(z, NULL_Z)
    unconditional = unet(x, t, null)
    z_embedding, unet.z_embedding = unet.z_embedding, None      # the same U-Net without any z input
    assert torch.allclose(unconditional, unet(x, t, z), atol=1e-6)
    unet.z_embedding = z_embedding
    diffusion = GaussianDiffusion(100)
    with torch.no_grad():
        conditional_x0 = diffusion._predict_x0(unet, x, t, z, None)
        unconditional_x0 = diffusion._predict_x0(unet, x, t, null, None)
        guided_x0 = diffusion._predict_x0(unet, x, t, z, None, guidance=2.5)
        assert torch.allclose(diffusion._predict_x0(unet, x, t, z, None, guidance=0.0), unconditional_x0, atol=1e-5)
    assert not torch.allclose(conditional_x0, unconditional_x0, atol=1e-3)
    # x_0 is affine in the prediction, so guidance extrapolates x_0 the same way
    assert torch.allclose(guided_x0, unconditional_x0 + 2.5 * (conditional_x0 - unconditional_x0), atol=1e-5)


def test_hide_z_hides_its_share_and_keeps_the_rest():
    """Both second stages train their unconditional branch on slices whose z hide_z replaced by
    NULL_Z: about `share` of them, the others untouched; share 0 hides nothing."""
    z = torch.arange(20_000) % 32
    hidden = hide_z(z, 0.25, torch.Generator().manual_seed(0))
    told = hidden != NULL_Z
    assert abs((~told).float().mean().item() - 0.25) < 0.01
    assert torch.equal(hidden[told], z[told])
    assert torch.equal(hide_z(z, 0.0), z)


def test_noise_schedule_matches_ddpm_formulas():
    diffusion = GaussianDiffusion(1000, 1e-4, 0.02)
    betas = np.linspace(1e-4, 0.02, 1000)
    assert np.allclose(diffusion.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-5)
    x0, noise, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([0, 499, 999])
    abar = torch.tensor(np.cumprod(1 - betas)[[0, 499, 999]], dtype=torch.float32)[:, None, None, None]
    assert torch.allclose(diffusion.add_noise(x0, t, noise), abar.sqrt() * x0 + (1 - abar).sqrt() * noise, atol=1e-6)


# data x0 ~ N(mean, std^2), each of 4 elements on its own
GAUSSIAN_MEAN = torch.tensor([1.0, -0.5, 0.0, 0.5]).view(1, 1, 2, 2)
GAUSSIAN_STD = torch.tensor([0.3, 0.5, 1.0, 0.7]).view(1, 1, 2, 2)


class GaussianDataPredictor(torch.nn.Module):
    """The exact noise / v predictor for Gaussian data, from the closed-form posterior mean
    E[x0 | x_t] = mean + std^2 sqrt(abar) / (abar std^2 + 1 - abar) (x_t - sqrt(abar) mean).
    Its x0 follows x_t, so every step of a sampler shapes what it returns (a predictor for a
    single data point would give that point at the last step whatever the steps before did)."""

    def __init__(self, diffusion):
        super().__init__()
        self.diffusion = diffusion

    def forward(self, x, t, z):
        abar = self.diffusion.alphas_cumprod[t][:, None, None, None]
        variance = GAUSSIAN_STD ** 2
        x0 = GAUSSIAN_MEAN + variance * abar.sqrt() / (abar * variance + 1 - abar) * (x - abar.sqrt() * GAUSSIAN_MEAN)
        noise = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        return noise if self.diffusion.prediction == "eps" else abar.sqrt() * noise - (1 - abar).sqrt() * x0


@pytest.fixture
def one_thread():
    """Thousands of sampler steps on small tensors: one thread is as fast as two, and with the
    other core busy, two made them 50x slower (each op waits for the descheduled thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_samplers_reach_the_gaussian_data_distribution(prediction, one_thread):
    """8192 samples: means within 0.05 std (4.5 standard errors), stds within 4% (DDPM with the
    posterior variance comes out 1% narrow at std 0.3, DDIM over all 1000 steps within 1.3%);
    DDIM over 50 steps comes out 4-9% narrow, DDPM respaced to 250 steps 1-5%, their
    discretisation error, so within 15% and 8%."""
    diffusion = GaussianDiffusion(1000, 1e-4, 0.02, prediction)
    predictor, shape, z = GaussianDataPredictor(diffusion), (8192, 1, 2, 2), torch.zeros(8192, dtype=torch.long)
    torch.manual_seed(0)
    ddpm, _ = diffusion.sample_ddpm(predictor, shape, z)
    for samples, std_tolerance in ((ddpm, 0.04), (diffusion.sample_ddim(predictor, shape, z, steps=1000), 0.04),
                                   (diffusion.sample_ddim(predictor, shape, z, steps=50), 0.15),
                                   (diffusion.sample_ddpm(predictor, shape, z, steps=250)[0], 0.08)):
        assert ((samples.mean(0) - GAUSSIAN_MEAN).abs() / GAUSSIAN_STD).max() < 0.05
        assert (samples.std(0) / GAUSSIAN_STD - 1).abs().max() < std_tolerance


def test_ddpm_keeps_one_shared_trajectory_and_samplers_clip_x0(one_thread):
    diffusion = GaussianDiffusion(1000, 1e-4, 0.02, "v")
    predictor, shape, z = GaussianDataPredictor(diffusion), (3, 1, 2, 2), torch.zeros(3, dtype=torch.long)
    torch.manual_seed(0)
    final, states = diffusion.sample_ddpm(predictor, shape, z, noise_groups=1, keep_every=100)
    assert len(states) == 11 and states[0].std() > 0.5 and torch.equal(states[-1], final)
    assert all(torch.equal(state[0], state[2]) for state in states)      # one shared trajectory
    # two volumes of two slices: one trajectory within each volume, different ones between them
    pairs = diffusion.sample_ddim(predictor, (4, 1, 2, 2), torch.zeros(4, dtype=torch.long), 10, noise_groups=2)
    assert torch.equal(pairs[0], pairs[1]) and torch.equal(pairs[2], pairs[3]) and not torch.allclose(pairs[0], pairs[2])
    # x_0 clipping: a bound inside the data's range caps what the samplers reach
    assert diffusion.sample_ddim(predictor, shape, z, steps=10).max() > 0.7
    assert diffusion.sample_ddim(predictor, shape, z, steps=10, x0_bound=0.5).abs().max() <= 0.5 + 1e-4
    assert diffusion.sample_ddpm(predictor, shape, z, x0_bound=0.5)[0].abs().max() <= 0.5 + 1e-4


def test_v_target_matches_its_definition():
    diffusion = GaussianDiffusion(1000, 1e-4, 0.02, "v")
    x0 = torch.randn(4, 2, 4, 4)
    captured = {}

    def model(x, t, z):
        captured.update(x=x, t=t)
        return torch.zeros_like(x)

    generator = torch.Generator().manual_seed(3)
    loss = diffusion.loss(model, x0, torch.zeros(4, dtype=torch.long), "mse", generator)
    generator = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (4,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    abar = torch.tensor(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), dtype=torch.float32)[t][:, None, None, None]
    v = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    assert torch.equal(captured["t"], t) and torch.allclose(loss, (v ** 2).mean(), rtol=1e-5)


# ----------------------------------------------------------------------------- scripts end to end
def test_latent_dataset_writes_each_split_in_order(first_stage_dir, demo_dir):
    import dataset
    train = util.load_checkpoint(str(first_stage_dir / "latents" / "vqvae_train.pt"))
    slices = dataset.OasisSlices("train", demo_dir, 32)
    assert train["latents"].shape == (64, 4, 8, 8) and train["indices"].shape == (64, 8, 8)
    assert torch.equal(train["z"], torch.from_numpy(slices.zs)) and train["config"]["NUM_CODES"] == 32
    vae = util.load_checkpoint(str(first_stage_dir / "latents" / "vae_test.pt"))
    assert vae["latents"].shape == (32, 8, 8, 8) and vae["indices"] is None   # mean and log-variance


def test_latent_dataset_keeps_the_last_partial_batch(first_stage_dir, demo_dir, tmp_path):
    """A batch size that does not divide the train split still encodes every slice."""
    import dataset
    run_script("latent_dataset.py", ["--FIRST_STAGE=vqvae", f"--CKPT_DIR={first_stage_dir}/ckpt", "--BATCH_SIZE=48",
                                     "--SPLITS=('train',)", f"--LATENT_DIR={tmp_path}"])
    train = util.load_checkpoint(str(tmp_path / "vqvae_train.pt"))
    assert torch.equal(train["z"], torch.from_numpy(dataset.OasisSlices("train", demo_dir, 32).zs))


def test_latents_of_other_data_record_it(first_stage_dir, demo_dir, tmp_path):
    """The second stage's searches and predict.py score against the data its latents came from,
    which need not be the first stage's."""
    import dataset
    other = tmp_path / "other_brains"
    shutil.copytree(dataset.image_folder(demo_dir, "validate"), dataset.image_folder(str(other), "validate"))
    run_script("latent_dataset.py", ["--FIRST_STAGE=vqvae", f"--CKPT_DIR={first_stage_dir}/ckpt", f"--DATA_DIR={other}",
                                     "--SPLITS=('validate',)", f"--LATENT_DIR={tmp_path}"])
    collected = util.load_checkpoint(str(tmp_path / "vqvae_validate.pt"))
    assert collected["config"]["DATA_DIR"] == str(other) and len(collected["z"]) == 32
    first_stage = util.load_checkpoint(str(first_stage_dir / "latents" / "vqvae_validate.pt"))
    assert first_stage["config"]["DATA_DIR"] == demo_dir


def test_prior_beats_the_code_histogram_reads_its_context_resumes_and_summarises(first_stage_dir, tmp_path):
    arguments = second_stage_args(first_stage_dir, *TINY_PRIOR, *NO_SEARCH["train_viT.py"], "--LR=5e-3", f"--CKPT_DIR={tmp_path}",
                                  f"--LOG_DIR={tmp_path}", f"--VISUALIZE_DIR={tmp_path}")
    trained_z = []              # every z the training steps hand the prior
    forward = CodePrior.forward

    def recording_forward(self, codes, z, **kwargs):
        if self.training:
            trained_z.append(z.clone())
        return forward(self, codes, z, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CodePrior, "forward", recording_forward)
        run_script("train_viT.py", arguments + ["--EPOCHS=15"])
    # Z_DROP = 0.1 of the 960 training slices are told no z: guidance's unconditional branch learns
    assert (torch.cat(trained_z) == NULL_Z).float().mean().item() == pytest.approx(0.1, abs=0.04)
    val = read_log(str(tmp_path / "vqvae_prior.log"))["val_loss"][1]
    assert len(val) == 15 and val[-1] < val[0] < math.log(32) + 0.1
    run_script("train_viT.py", arguments + ["--EPOCHS=16"])
    assert util.load_checkpoint(str(tmp_path / "vqvae_prior_last.pt"))["epoch"] == 16
    assert np.array_equal(read_log(str(tmp_path / "vqvae_prior.log"))["train_loss"][0], np.arange(16 * 8))
    summary = json.loads((tmp_path / "vqvae_prior_summary.json").read_text())
    assert (tmp_path / "vqvae_prior_samples_best.png").exists()
    # each position's code histogram (smoothing chosen on validate) is about what a prior blind to
    # its context reaches: 1.80 nats here, the prior 1.50 (0.16-0.30 lower under seeds 0-4)
    assert summary["test_nats_per_code"] < summary["test_nats_per_code_histogram"] - 0.1
    # on held-out codes, the context of the slice 16 z-indices away, or that slice's z, cost the prior;
    # z is read where the context says little yet: the first row of codes (later codes reveal z too)
    prior, _ = load_prior(str(tmp_path / "vqvae_prior_best.pt"), "cpu")
    test = util.load_checkpoint(str(first_stage_dir / "latents" / "vqvae_test.pt"))
    codes, z = test["indices"], test["z"]
    with torch.no_grad():
        told = {"true": (codes, z), "other context": (codes.roll(16, 0), z), "other z": (codes, (z + 16) % 32),
                "no z": (codes, torch.full_like(z, NULL_Z))}
        nats = {name: nats_per_code(prior(context, zs), codes).item() for name, (context, zs) in told.items()}
        first_row = {name: nats_per_code(prior(context, zs)[:, :codes.shape[2]], codes[:, :1]).item()
                     for name, (context, zs) in told.items()}
    assert nats["true"] == pytest.approx(summary["test_nats_per_code"], abs=1e-5)
    assert nats["other context"] > nats["true"] + 0.5                       # +1.08
    assert first_row["other z"] > first_row["true"] + 0.1                   # +0.30 (over all codes: +0.05)
    # told no z (guidance's unconditional branch), the prior hedges between the slices: worse than
    # told the right z, better than told a wrong one (1.30 < 1.51 < 1.71 nats)
    assert first_row["true"] + 0.1 < first_row["no z"] < first_row["other z"] - 0.1


def test_second_stages_refuse_the_latents_of_a_first_stage_changed_since(first_stage_dir, tmp_path):
    """A prior trained on one version of the first stage's codes, resumed or sampled after the
    first stage was trained on and its latents collected again, would read codes that mean other
    things now: both are refused, naming the file."""
    from latent_dataset import weights_fingerprint
    from model_VAE import load_first_stage
    latents = tmp_path / "latents"
    shutil.copytree(first_stage_dir / "latents", latents)
    collected = util.load_checkpoint(str(latents / "vqvae_train.pt"))
    assert collected["first_stage_weights"] == weights_fingerprint(load_first_stage(collected["checkpoint"], "cpu")[0])
    one_setting = ["--TOP_PS=(1.0,)", "--GUIDANCE_SCALES=(1.0,)"]      # no search: no critic needed here
    arguments = second_stage_args(tmp_path, *TINY_PRIOR, *one_setting) + [f"--LATENT_DIR={latents}"]
    run_script("train_viT.py", arguments + ["--EPOCHS=1"])
    for critic in (first_stage_dir / "ckpt").glob("critic_*.pt"):     # predict.py's realism table needs it
        shutil.copy(critic, tmp_path / "ckpt")
    for split in ("train", "test"):       # what latent_dataset.py writes after the first stage changed
        collected = util.load_checkpoint(str(latents / f"vqvae_{split}.pt"))
        util.save_checkpoint(collected | {"first_stage_weights": "0123456789abcdef"}, str(latents / f"vqvae_{split}.pt"))
    with pytest.raises(util.UserError, match="vqvae_prior_last.pt was trained on the latents of another version"):
        run_script("train_viT.py", arguments + ["--EPOCHS=2"])
    with pytest.raises(util.UserError, match="vqvae_prior_best.pt was trained on the latents of another version"):
        run_script("predict.py", second_stage_args(tmp_path, *TINY_PREDICT) + [f"--LATENT_DIR={latents}"])


def test_prior_refuses_vae_latents(first_stage_dir, tmp_path):
    with pytest.raises(SystemExit, match="holds VAE latents"):
        run_script("train_viT.py", second_stage_args(first_stage_dir, "--FIRST_STAGE=vae", f"--CKPT_DIR={tmp_path}"))


def test_missing_latents_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(util.UserError, match="vqvae_train.pt do not exist; run python latent_dataset.py"):
        run_script("stable_diffusion.py", second_stage_args(tmp_path))


def test_diffusion_training_improves_and_predict_pictures_everything(first_stage_dir, demo_dir):
    # snap temperatures above 0 only: the GIF below must end on the volume scored, whose codes were drawn
    run_script("stable_diffusion.py", second_stage_args(first_stage_dir, "--EPOCHS=6", *TINY_DIFFUSION,
                                                        "--SNAP_TEMPERATURES=(1.0, 2.0)"))
    log = read_log(str(first_stage_dir / "log" / "vqvae_diffusion.log"))
    val = log["val_loss"][1]
    assert len(val) == 6 and val[-1] < 0.9 * val[0]
    run_script("train_viT.py", second_stage_args(first_stage_dir, "--EPOCHS=1", *default_precision(TINY_PRIOR)))
    assert_bf16_by_default(first_stage_dir / "log" / "vqvae_prior_summary.json")
    # each sampler's setting was chosen on validate: the best mean rank over the searched ones
    for run, setting, options in (("prior", "sampling", 4), ("diffusion", "sampling", 3 * 2)):
        summary = json.loads((first_stage_dir / "log" / f"vqvae_{run}_summary.json").read_text())
        search = summary[f"{setting}_search"]
        assert len(search) == options and min(search, key=lambda row: row["mean_rank"])["setting"] == summary[setting]
        assert util.load_checkpoint(str(first_stage_dir / "ckpt" / f"vqvae_{run}_best.pt"))[setting] == summary[setting]
    run_script("predict.py", second_stage_args(first_stage_dir, *TINY_PREDICT, "--GIF_FRAMES=10",
                                               f"--VOLUMES_DIR={first_stage_dir / 'generated'}"))
    results = json.loads((first_stage_dir / "log" / "vqvae_predict.json").read_text())
    assert 0 < results["ssim"] <= 1 and 0 < results["codebook_usage"] <= 1
    realism = json.loads((first_stage_dir / "log" / "vqvae_realism.json").read_text())
    samplers = ("histogram", "prior", "diffusion_ddim50", "diffusion_ddpm100")
    assert list(realism["sources"]) == ["real_validate", "validate_blurred", "validate_noisy", "validate_speckled",
                                        "reconstruction", *samplers]
    for name in samplers:                        # 2 volumes each: every metric, diversity included
        assert set(realism["sources"][name]["figures"]) == set(METRICS), name
        assert realism["sources"][name]["volumes"] == 2
    for needs_two_volumes in ("diversity_ssim", "identity_correlation"):     # one validate brain: no pairs
        assert needs_two_volumes not in realism["sources"]["real_validate"]["figures"]
    for name, entry in realism["sources"].items():
        assert set(entry["distance_to_real"]) <= set(entry["figures"]) and all(
            value >= 0 for value in entry["distance_to_real"].values()), name
    for name in samplers:     # each sampler's volumes as data, in (brain, z) order: the grey levels its picture shows
        folder = first_stage_dir / "generated" / f"vqvae_{name}"
        info = json.loads((folder / "dataset_info.json").read_text())
        assert info["sampler"] == name and "not real brains" in info["kind"]
        with Image.open(first_stage_dir / "visualize" / f"vqvae_generated_{name}.png") as picture:
            grid = np.asarray(picture)                   # the first volume, 4 x 8 slices, 2 px apart
        size = (grid.shape[1] - 2) // 8 - 2
        pictured = np.stack([grid[2 + row * (size + 2):][:size, 2 + column * (size + 2):][:, :size]
                             for row in range(4) for column in range(8)])
        written = dataset.OasisSlices("test", str(folder), size)
        assert written.volumes().shape == (2, 32, 1, size, size)
        assert np.array_equal(written.images[:32], pictured), name
        nifti = nibabel.load(str(folder / "nifti_test" / "case_1.nii.gz"))   # the same, in the demo brains' frame
        assert np.array_equal(np.asarray(nifti.dataobj).transpose(2, 1, 0), pictured), name
        assert np.allclose(nifti.affine, dataset.resized_frame(dataset.data_frame(demo_dir), size)), name
    blurred = realism["sources"]["validate_blurred"]["figures"]
    assert blurred["sharpness"] < 1 < realism["sources"]["validate_noisy"]["figures"]["sharpness"]
    speckled, real = (realism["sources"][name]["figures"] for name in ("validate_speckled", "real_validate"))
    assert speckled["detail_kurtosis"] < real["detail_kurtosis"] - 0.5     # Gaussian speckle, sparse real detail
    gif_path = first_stage_dir / "visualize" / "vqvae_denoising.gif"
    frames = iio.imread(str(gif_path), index=None)
    assert frames.shape[:3] == (11, 4 * 34 + 2, 8 * 34 + 2)    # noise + every 10th of 100 states; 4 x 8 grid
    with Image.open(first_stage_dir / "visualize" / "vqvae_generated_diffusion_ddpm100.png") as generated:
        assert np.array_equal(frames[-1][..., 0], np.asarray(generated))    # ends on the volume scored
    with Image.open(gif_path) as gif:
        durations = [frame.info["duration"] for frame in ImageSequence.Iterator(gif)]
    assert durations[0] == 40 and durations[-1] == 1000    # 25 fps (GIF keeps centiseconds), last held 1 s
    pictures = os.listdir(first_stage_dir / "visualize")
    for name in ("codebook_usage", "latents_tsne", "generated_prior", "generated_diffusion_ddpm100",
                 "realism_sources", "validate_blurred"):
        assert f"vqvae_{name}.png" in pictures
    with Image.open(first_stage_dir / "visualize" / "vqvae_latents_tsne.png") as tsne:
        assert tsne.width > 2 * tsne.height      # two panels side by side: by z and by brain
    with Image.open(first_stage_dir / "visualize" / "vqvae_realism_sources.png") as sources:
        assert sources.height > sources.width / 2   # one row per source (8 of them), 8 columns of z
    # a prior whose sampling an older version chose (top-k, before nucleus sampling): predict.py
    # names the file and the fix instead of failing on an unknown keyword
    prior_path = str(first_stage_dir / "ckpt" / "vqvae_prior_best.pt")
    checkpoint = util.load_checkpoint(prior_path)
    util.save_checkpoint(dict(checkpoint, sampling={"temperature": 1.0, "top_k": 0, "guidance": 1.0}), prior_path)
    with pytest.raises(util.UserError, match="vqvae_prior_best.pt has no sampling settings .* re-run train_viT.py"):
        run_script("predict.py", second_stage_args(first_stage_dir, *TINY_PREDICT))
    util.save_checkpoint(checkpoint, prior_path)


@pytest.mark.parametrize("brains", [1, 8, 12, 25])
def test_tsne_gives_each_brain_its_own_colour_band(brains):
    """The t-SNE by brain: one colour per brain, in its own band of the colour bar (tab20 over
    8 brains gave 20 bands, and pairs of brains like hues)."""
    from predict import brain_colours
    colormap, norm = brain_colours(brains)
    colours = [tuple(colormap(norm(rank))) for rank in range(brains)]
    assert len(set(colours)) == brains
    assert all(tuple(colormap(norm(rank + offset))) == colours[rank]
               for rank in range(brains) for offset in (-0.4, 0.4))     # a band either side of its tick


def test_diffusion_learns_to_use_its_timestep_and_z(first_stage_dir, tmp_path):
    """Told a wrong t or z, the trained U-Net must do clearly worse on validate latents; a U-Net
    that ignores t or z would do exactly as well. With seeds 0-3 on an AVX2 CPU it did 10-12% and
    50-54% worse. After 8 epochs it was 4.5-8% and 12-29%: too close to call on every CPU."""
    run_script("stable_diffusion.py", second_stage_args(
        first_stage_dir, *TINY_DIFFUSION, *NO_SEARCH["stable_diffusion.py"], "--EPOCHS=16", "--BATCH_SIZE=4", "--LR=3e-3",
        "--EMA_DECAY=0.9", "--EVAL_EVERY=3",
        f"--CKPT_DIR={tmp_path}", f"--LOG_DIR={tmp_path}", f"--VISUALIZE_DIR={tmp_path}"))
    unet, diffusion, checkpoint = load_diffusion(str(tmp_path / "vqvae_diffusion_best.pt"), "cpu")
    steps_per_epoch = checkpoint["step"] // checkpoint["epoch"]     # validated every 3 epochs and after the last
    assert list(read_log(str(tmp_path / "vqvae_diffusion.log"))["val_loss"][0]) == [
        epoch * steps_per_epoch - 1 for epoch in (3, 6, 9, 12, 15, 16)]
    validate = util.load_checkpoint(str(first_stage_dir / "latents" / "vqvae_validate.pt"))
    stats = checkpoint["stats"]
    latents = ((diffusion_latents(validate) - stats["latent_mean"]) / stats["latent_std"]).repeat(4, 1, 1, 1)
    zs = validate["z"].repeat(4)

    def loss(told_t, told_z):
        """The loss at fixed timesteps and noise, with the U-Net told told_t(t) and told_z(z)."""
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return diffusion.loss(lambda x, t, z: unet(x, told_t(t), told_z(z)), latents, zs, "mse", generator).item()

    def same(values):
        return values

    true = loss(same, same)
    assert loss(lambda t: torch.full_like(t, 500), same) > 1.05 * true       # its t-blind twin
    assert loss(same, lambda z: (z + 16) % 32) > 1.25 * true                # the slice 16 z-indices away


@pytest.mark.parametrize("script, extra", [("train_viT.py", TINY_PRIOR), ("stable_diffusion.py", TINY_DIFFUSION)])
def test_torchrun_two_processes(first_stage_dir, tmp_path, script, extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")   # two CPU processes (gloo), GPU or not
    # --standalone: rendezvous on a free port (a fixed one can be taken on a shared machine)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--standalone", os.path.join(ROOT, script),
                             *second_stage_args(first_stage_dir, "--EPOCHS=1", *extra, *NO_SEARCH[script],
                                                "--PATCH_SIZE=2",     # the defaults' 2x2 patches
                                                f"--CKPT_DIR={tmp_path}",
                                                f"--LOG_DIR={tmp_path}", f"--VISUALIZE_DIR={tmp_path}")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stderr, result.stderr[-3000:]      # e.g. DDP's on gradient strides
    run = script.replace("train_viT.py", "vqvae_prior").replace("stable_diffusion.py", "vqvae_diffusion")
    summary = json.loads((tmp_path / f"{run}_summary.json").read_text())
    batch = 8 if script == "train_viT.py" else 16
    assert summary["processes"] == 2
    assert util.load_checkpoint(str(tmp_path / f"{run}_last.pt"))["step"] == 64 // (2 * batch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("script, extra, run, weights", [("train_viT.py", TINY_PRIOR, "vqvae_prior", ("model",)),
                                                         ("stable_diffusion.py", TINY_DIFFUSION, "vqvae_diffusion",
                                                          ("model", "ema_model"))])
def test_cuda_graph_steps_train_as_eager_steps_do(first_stage_dir, tmp_path, script, extra, run, weights):
    """With CUDA_GRAPHS on a GPU the steps are replayed as a CUDA graph from the 4th: the same
    training as eager steps (the diffusion's timesteps, noise and dropped z drawn alike), within
    the spread of two eager runs."""
    for name, graphs in (("graphed", True), ("eager", False), ("eager_again", False)):
        run_script(script, second_stage_args(first_stage_dir, "--EPOCHS=3", *extra, *NO_SEARCH[script],
                                             f"--CUDA_GRAPHS={graphs}", f"--CKPT_DIR={tmp_path / name}",
                                             f"--LOG_DIR={tmp_path / name}", f"--VISUALIZE_DIR={tmp_path / name}"))
    last = [util.load_checkpoint(str(tmp_path / name / f"{run}_last.pt")) for name in ("graphed", "eager", "eager_again")]
    assert_within_eager_spread(*last, weights)
    logs = [read_log(str(tmp_path / name / f"{run}.log")) for name in ("graphed", "eager")]
    assert np.allclose(logs[0]["train_loss"][1], logs[1]["train_loss"][1], rtol=0.02)


def test_intensity_matching_undoes_a_scanners_intensity_curve(first_stage_dir, demo_dir, tmp_path):
    """A real brain whose intensities went through another scanner's curve (darker, more contrast):
    matched to the training brains' intensities it scores nearly as the brain itself, unmatched
    far worse; match_intensity gives a brain back its own values when it is the reference."""
    import score_scans
    volume = dataset.OasisSlices("test", demo_dir, 32).volumes()
    curve = lambda x: 2 * (0.6 * ((x + 1) / 2) ** 1.6) - 1      # noqa: E731 (on [-1, 1], background kept)
    assert (score_scans.match_intensity(curve(volume), volume, [1]) - volume).abs().max() < 1e-3
    with pytest.raises(util.UserError, match="brain 7 of DATA_DIR .* is all background"):
        score_scans.match_intensity(torch.cat([volume, torch.full_like(volume, -1)]), volume, [6, 7])
    scanner = tmp_path / "scanner" / "keras_png_slices_test"
    scanner.mkdir(parents=True)
    lookup = np.round(255 * 0.6 * (np.arange(256) / 255) ** 1.6).astype(np.uint8)
    for path in (pathlib.Path(dataset.image_folder(demo_dir, "test"))).glob("*.png"):
        Image.fromarray(lookup[np.asarray(Image.open(path))]).save(scanner / path.name)
    shutil.copytree(dataset.image_folder(demo_dir, "test"), tmp_path / "same" / "keras_png_slices_test")
    arguments = [f"--CKPT_DIR={first_stage_dir}/ckpt", f"--LOG_DIR={tmp_path}", f"--VISUALIZE_DIR={tmp_path}"]
    ssim = {}
    for folder, match in (("same", False), ("scanner", False), ("scanner", True)):
        run_script("score_scans.py", arguments + [f"--DATA_DIR={tmp_path / folder}", f"--MATCH_INTENSITY={match}"])
        ssim[folder, match] = json.loads((tmp_path / f"vqvae_scans_{folder}.json").read_text())["ssim"]
    # the curve costs 0.17 SSIM here (0.848 -> 0.674); matching wins back all but 0.011 of it
    lost, left = ssim["same", False] - ssim["scanner", False], ssim["same", False] - ssim["scanner", True]
    assert lost > 0.1 and left < 0.15 * lost


def test_vae_pipeline_diffuses_posterior_means_and_predicts(first_stage_dir):
    run_script("stable_diffusion.py", second_stage_args(first_stage_dir, "--FIRST_STAGE=vae", "--EPOCHS=1",
                                                        *default_precision(TINY_DIFFUSION)))
    assert_bf16_by_default(first_stage_dir / "log" / "vae_diffusion_summary.json")
    checkpoint = util.load_checkpoint(str(first_stage_dir / "ckpt" / "vae_diffusion_best.pt"))
    assert checkpoint["stats"]["latent_shape"] == (4, 8, 8)       # the means, not mean and log-variance
    from sklearn.manifold import TSNE
    fit_transform, embedded = TSNE.fit_transform, []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TSNE, "fit_transform", lambda self, x: embedded.append(x.shape) or fit_transform(self, x))
        run_script("predict.py", second_stage_args(first_stage_dir, *TINY_PREDICT, "--FIRST_STAGE=vae",
                                                   "--GIF_FRAMES=2"))
    assert embedded == [(32, 4 * 8 * 8)]      # the t-SNE of the test brain's 32 posterior means
    results = json.loads((first_stage_dir / "log" / "vae_predict.json").read_text())
    assert "codebook_usage" not in results and 0 < results["ssim"] <= 1
    realism = json.loads((first_stage_dir / "log" / "vae_realism.json").read_text())
    assert list(realism["sources"]) == ["real_validate", "validate_blurred", "validate_noisy", "validate_speckled",
                                        "reconstruction", "gaussian", "diffusion_ddim50", "diffusion_ddpm100"]


def test_score_scans_on_a_converted_nifti_volume(first_stage_dir, tmp_path, capsys):
    """A scan 12 mm right of the template's place, converted as test brain 2 (brain 1, the scan in
    place, goes to train), is scored, and written as scored and reconstructed under its own id and
    in its own scan's mm, not the template's."""
    scans = dataset.convert_nifti([write_small_volume(tmp_path / "a_in_place.nii.gz"),
                                   write_small_volume(tmp_path / "b_moved.nii.gz", right_mm=12)],
                                  str(tmp_path / "my_scans"), (1, 0, 1))
    arguments = [f"--CKPT_DIR={first_stage_dir}/ckpt", f"--LOG_DIR={tmp_path}", f"--VISUALIZE_DIR={tmp_path}"]
    with pytest.raises(util.UserError, match="give the folder to score: python score_scans.py --DATA_DIR="):
        run_script("score_scans.py", arguments)
    run_script("score_scans.py", arguments + [f"--DATA_DIR={scans}", "--MATCH_INTENSITY=False",
                                              f"--VOLUMES_DIR={tmp_path / 'volumes'}"])
    results = json.loads((tmp_path / "vqvae_scans_my_scans.json").read_text())
    # the per-z figures are those of the first stage's own reconstruction of the converted slices,
    # on the script's device (a GPU's TF32 convolutions differ from the CPU's by ~1e-3 SSIM)
    device = util.get_device()
    model, config = load_first_stage(str(first_stage_dir / "ckpt" / "vqvae_best.pt"), device)
    volume = dataset.OasisSlices("test", scans, config["IMG_SIZE"]).volumes()[0].to(device)
    with torch.no_grad():
        reconstruction = model.reconstruct(volume, torch.arange(32, device=device))[0]
    expected = util.reconstruction_ssim(volume, reconstruction)
    assert results["ssim_per_z"] == pytest.approx(expected.tolist(), abs=1e-5)
    assert list(results["ssim_per_brain"]) == ["2"] and results["ssim"] == pytest.approx(expected.mean().item())
    assert f"brain 2: {results['ssim']:.4f}" in capsys.readouterr().out
    home = results["realism_against_first_stage_test"]["sources"]
    assert set(home) == {"your_scans", "reconstructions"}
    assert {"frechet_distance", "tissue_wasserstein", "sharpness", "z_faithfulness"} <= set(home["your_scans"]["figures"])
    # what the tiny first stage loses on these scans: their fine texture
    assert results["realism_against_your_scans"]["sources"]["reconstructions"]["figures"]["sharpness"] < 0.8
    for picture in ("vqvae_scans_my_scans_brain2.png", "vqvae_scans_my_scans_ssim.png"):
        assert (tmp_path / picture).exists()
    # the brain as scored and its reconstruction, as data and as NIfTI volumes in the scan's own mm
    frames = dataset.brain_frames(scans)
    centres = [np.asarray(frames[brain]["affine"]) @ [127.5, 127.5, 15.5, 1] for brain in (1, 2)]
    assert np.allclose(centres[1][:3], centres[0][:3] + [12, 0, 0], atol=1)         # mm
    size = config["IMG_SIZE"]
    for kind, scored in (("scored", volume), ("reconstructed", reconstruction)):
        folder = str(tmp_path / "volumes" / f"vqvae_scans_my_scans_{kind}")
        written = dataset.OasisSlices("test", folder, size)
        assert (written.volumes()[0] - scored.float().cpu().clamp(-1, 1)).abs().max() < 1 / 255 + 1e-3, kind
        nifti = nibabel.load(os.path.join(dataset.nifti_folder(folder, "test"), "case_2.nii.gz"))
        assert np.array_equal(np.asarray(nifti.dataobj).transpose(2, 1, 0), written.images), kind
        affine = dataset.resized_frame(frames[2], size)
        assert np.allclose(nifti.affine, affine) and dataset.brain_frames(folder) == {2: {"size": size,
                                                                                         "affine": affine.tolist()}}
