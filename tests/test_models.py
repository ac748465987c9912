import contextlib
import importlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import model_diffusion
import model_prior
import util

from model_discriminator import PatchDiscriminator, adaptive_gan_weight, hinge_discriminator_loss
from model_VAE import VAE, VQVAE, build_model, evaluate_reconstructions
from module import ResBlock, VectorQuantizer, argmin_rows, codebook_stats, group_norm, gumbel_max

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(base_channels=16, channel_mults=(1, 2), num_res_blocks_encoder=1, num_res_blocks_decoder=1,
             patch_size=2)


@pytest.mark.parametrize("conditioned", [True, False])
def test_autoencoder_shapes(conditioned):
    torch.manual_seed(0)
    images, z = torch.rand(3, 1, 64, 64) * 2 - 1, torch.tensor([0, 7, 31])
    kwargs = dict(SMALL, num_z_positions=32 if conditioned else None)
    vqvae, vae = VQVAE(num_codes=32, code_dim=4, **kwargs), VAE(latent_channels=6, **kwargs)
    assert vqvae.encode(images, z).shape == (3, 4, 16, 16) and vqvae.latent_shape(64) == (4, 16, 16)
    reconstruction, vq_loss, indices = vqvae(images, z)
    assert reconstruction.shape == images.shape and indices.shape == (3, 16, 16) and vq_loss.ndim == 0
    mean, logvar = vae.encode(images, z)
    assert mean.shape == logvar.shape == (3, 6, 16, 16)
    reconstruction, kl, none = vae(images, z)
    assert reconstruction.shape == images.shape and kl.ndim == 0 and none is None
    assert vae.sample(2, z[:2], 64).shape == (2, 1, 64, 64)


def test_res_block_counts_per_level():
    kwargs = dict(SMALL, num_res_blocks_encoder=(0, 2), num_res_blocks_decoder=(1, 3))
    model = VQVAE(num_codes=32, code_dim=4, **kwargs)
    count = lambda part: sum(isinstance(m, ResBlock) for m in part.modules())
    assert (count(model.encoder), count(model.decoder)) == (0 + 2 + 2, 2 + 3 + 1)   # + 2 middle blocks each
    assert model(torch.zeros(1, 1, 32, 32), torch.tensor([0]))[0].shape == (1, 1, 32, 32)
    with pytest.raises(ValueError):
        VQVAE(**dict(SMALL, num_res_blocks_encoder=(1, 1, 1)))


def test_z_condition_changes_the_decoder_output():
    torch.manual_seed(0)
    model = VQVAE(num_codes=32, code_dim=4, num_z_positions=32, **SMALL).eval()
    latents = torch.randn(1, 4, 16, 16).repeat(2, 1, 1, 1)
    out = model.decode(latents, torch.tensor([3, 20]))
    assert (out[0] - out[1]).abs().mean() > 1e-3


def test_vae_kl_against_closed_form():
    model = VAE(latent_channels=2, **SMALL)
    mean, logvar = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    model.encode = lambda images, z: (mean, logvar)
    _, kl, _ = model(torch.zeros(2, 1, 16, 16), torch.zeros(2, dtype=torch.long))
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1).mean()
    assert kl.item() == pytest.approx(expected.item(), rel=1e-5)


# ----------------------------------------------------------------------------- vector quantizer
def test_quantizer_picks_the_nearest_code_and_passes_gradients_straight_through():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(16, 3).eval()
    latents = torch.randn(2, 3, 5, 5, requires_grad=True)
    quantised, indices, loss = quantizer(latents)
    vectors = latents.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.equal(indices.flatten(), torch.cdist(vectors, quantizer.codebook).argmin(1))
    assert torch.allclose(quantised.detach(), quantizer.embed_indices(indices))
    (quantised * torch.arange(5.0)).sum().backward()
    assert torch.allclose(latents.grad, torch.arange(5.0).expand_as(latents))   # identity gradient


@pytest.mark.parametrize("width", [1024, 1000])   # blocks of 32, and a width they do not divide
def test_two_level_argmin_is_argmin_ties_included(width):
    torch.manual_seed(0)
    scores = torch.randn(300, width).round(decimals=1)   # rounded: many rows tie for their minimum
    scores[7] = 0.0                                       # a row that is all ties
    assert torch.equal(argmin_rows(scores), scores.argmin(1))
    assert argmin_rows(scores)[7] == 0


def test_snapped_codes_are_drawn_by_proximity():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(6, 2).eval()
    vectors = torch.randn(3, 2)
    assert torch.equal(quantizer.draw_code(vectors, 0.0, None), torch.cdist(vectors, quantizer.codebook).argmin(1))
    on_codes = quantizer.codebook[[4, 1]]
    assert torch.equal(quantizer.draw_code(on_codes, 3.0, torch.rand(2)), torch.tensor([4, 1]))      # a code's own vector keeps it
    # frequencies of 20,000 draws of one vector against the law written out from exact distances
    distances = torch.cdist(vectors[:1].double(), quantizer.codebook.double())[0] ** 2
    nearest = distances.min()
    law = torch.softmax(-(distances - nearest) / (2.0 * nearest), 0)
    drawn = quantizer.draw_code(vectors[:1].expand(20000, 2), 2.0, torch.rand(20000))
    assert torch.allclose(torch.bincount(drawn, minlength=6).double() / 20000, law, atol=0.01)
    assert law.max() < 0.9        # the law is spread: the check above could fail
    # a uniform in the middle of code k's share of the cumulative law draws code k (inverse CDF)
    uniforms = (law.cumsum(0) - law / 2).float()
    assert torch.equal(quantizer.draw_code(vectors[:1].expand(6, 2), 2.0, uniforms), torch.arange(6))


def test_gumbel_max_draws_alike_where_two_laws_agree():
    """Two laws over 256 codes that differ only in code 7's logit, drawn with the same uniforms:
    every draw that is not code 7 under one law is the same code under the other (inverting the
    cumulative laws at one uniform would shift every code after 7)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 256, generator=generator)
    lowered = logits.clone()
    lowered[:, 7] -= 3.0
    uniforms = torch.rand(4000, 256, generator=generator)
    first, second = gumbel_max(logits, uniforms), gumbel_max(lowered, uniforms)
    assert torch.equal(first[first != 7], second[first != 7]) and (first[second == 7] == 7).all()
    assert (second != first).sum() > 10         # most of the rows that drew code 7 drew another


def test_snap_draws_alike_within_a_volume_and_apart_across_volumes():
    torch.manual_seed(0)
    model = VQVAE(num_codes=32, code_dim=4, **SMALL).eval()
    latents = torch.randn(1, 4, 3, 3).expand(6, 4, 3, 3)      # 2 volumes of 3 slices, every slice alike
    snapped = model.snap(latents, 5.0, noise_groups=2)
    first, second = snapped[:3], snapped[3:]
    assert torch.equal(first, first[:1].expand_as(first)) and torch.equal(second, second[:1].expand_as(second))
    assert not torch.equal(first[0], second[0])
    independent = model.snap(latents, 5.0)
    assert not torch.equal(independent[0], independent[1])


def test_off_codebook_share_against_exact_distances():
    torch.manual_seed(0)
    model = VQVAE(num_codes=32, code_dim=4, **SMALL).eval()
    codebook = model.quantizer.codebook
    on_codes = codebook[torch.randint(0, 32, (2, 3, 3))].permute(0, 3, 1, 2)      # (B, d, h, w) of codes
    assert model.off_codebook_share(on_codes) == pytest.approx(0.0, abs=1e-6)
    latents = on_codes + 0.3 * torch.randn(on_codes.shape)
    vectors = latents.permute(0, 2, 3, 1).reshape(-1, 4).double()
    off = (torch.cdist(vectors, codebook.double()).min(1).values ** 2).sum()
    spread = ((vectors - vectors.mean(0)) ** 2).sum()
    assert model.off_codebook_share(latents) == pytest.approx((off / spread).item(), rel=1e-4)
    assert 0.01 < model.off_codebook_share(latents) < 0.5      # neither bound of the figure: the check could fail


def test_commitment_loss_pulls_the_encoder_output_toward_its_code():
    """beta x mean squared distance to the nearest code, with its gradient on the latents
    (the codebook follows EMAs and gets none)."""
    torch.manual_seed(0)
    quantizer = VectorQuantizer(16, 3, commitment_weight=0.25).eval()
    latents = torch.randn(2, 3, 5, 5, requires_grad=True)
    quantised, _, loss = quantizer(latents)
    nearest = quantised.detach()
    assert loss.item() == pytest.approx(0.25 * ((latents.detach() - nearest) ** 2).mean().item(), rel=1e-6)
    loss.backward()
    assert torch.allclose(latents.grad, 0.25 * 2 * (latents.detach() - nearest) / latents.numel(), atol=1e-8)


def test_reconstruction_gradient_reaches_the_encoder_through_the_quantizer():
    torch.manual_seed(0)
    model = VQVAE(num_codes=32, code_dim=4, num_z_positions=32, **SMALL)
    images, z = torch.rand(2, 1, 32, 32) * 2 - 1, torch.tensor([1, 2])
    reconstruction, _, _ = model(images, z)
    F.l1_loss(reconstruction, images).backward()     # no commitment term: only the straight-through path
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert not list(model.quantizer.parameters())     # the codebook follows EMAs, not gradients


def test_quantizer_leaves_the_codebook_alone_in_eval_mode():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(8, 2)
    quantizer(torch.randn(1, 2, 4, 4))
    before = {name: buffer.clone() for name, buffer in quantizer.named_buffers()}
    quantizer.eval()(5 + torch.randn(1, 2, 4, 4))
    assert all(torch.equal(before[name], buffer) for name, buffer in quantizer.named_buffers())


@pytest.mark.parametrize("training", [True, False])
def test_evaluating_reconstructions_leaves_the_model_in_its_mode_and_its_codebook_alone(training):
    """pre_train.py evaluates a model in training and goes on training it; predict.py evaluates one
    loaded for inference and goes on encoding with it, which in training mode would move its codes."""
    torch.manual_seed(0)
    vqvae = VQVAE(num_codes=32, code_dim=4, num_z_positions=32, **SMALL).train(training)
    before = {name: buffer.clone() for name, buffer in vqvae.named_buffers()}
    loader = [(torch.rand(4, 1, 32, 32) * 2 - 1, None, None, torch.arange(4))]
    ssim, code_counts = evaluate_reconstructions(vqvae, loader, "cpu", contextlib.nullcontext)
    assert vqvae.training == training and 0 < ssim < 1 and code_counts.sum() == 4 * 8 * 8
    assert all(torch.equal(before[name], buffer) for name, buffer in vqvae.named_buffers())


def test_quantizer_runs_in_fp32_under_autocast():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(64, 8).eval()
    latents = torch.randn(2, 8, 8, 8)
    _, expected, _ = quantizer(latents)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        quantised, indices, loss = quantizer(latents.bfloat16())
    assert quantised.dtype == loss.dtype == torch.float32
    assert torch.equal(indices, quantizer.nearest_code(latents.bfloat16().permute(0, 2, 3, 1).reshape(-1, 8)).view(2, 8, 8))
    assert (indices == expected).float().mean() > 0.9       # only bf16 rounding of the input differs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_group_norm_stays_bf16_under_cuda_autocast():
    torch.manual_seed(0)
    norm = group_norm(64).cuda()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = (3 * torch.randn(4, 64, 16, 16) + 1).cuda()
    reference = F.group_norm(x, 32, norm.weight, norm.bias, 1e-6)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = norm(x)
    assert out.dtype == torch.bfloat16                     # nn.GroupNorm would give fp32 here
    assert (out.float() - reference).abs().max() < 0.1     # bf16 rounding of input and output: < 0.05
    out.float().square().sum().backward()
    assert norm.weight.grad.dtype == torch.float32 and norm.weight.grad.abs().sum() > 0


def _quantizer_on_two_ranks(rank, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(rank)                              # different random restarts unless synchronised
    quantizer = VectorQuantizer(16, 2, ema_decay=0.5)
    centre = -5.0 if rank == 0 else 5.0                  # each rank sees only one of two clusters
    for _ in range(10):
        quantizer(centre + torch.randn(2, 2, 4, 4))
    for buffer in (quantizer.codebook, quantizer.ema_cluster_size, quantizer.ema_code_sum):
        gathered = [torch.empty_like(buffer) for _ in range(2)]
        dist.all_gather(gathered, buffer)
        assert torch.equal(gathered[0], gathered[1])
    means = quantizer.codebook.mean(1)
    assert (means < -3).any() and (means > 3).any()     # the codebook learned from both ranks' data
    dist.destroy_process_group()


def test_quantizer_keeps_one_codebook_across_ddp_processes(tmp_path):
    mp.spawn(_quantizer_on_two_ranks, args=(str(tmp_path / "rendezvous"),), nprocs=2)


def test_ema_moves_codes_toward_their_data():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(4, 2, ema_decay=0.5, dead_code_threshold=0.0)
    quantizer(torch.randn(1, 2, 8, 8))           # first call: data init
    target = torch.tensor([3.0, -2.0])
    code = quantizer.nearest_code(target[None]).item()
    before = (quantizer.codebook[code] - target).norm()
    for _ in range(5):
        quantizer(target.view(1, 2, 1, 1).expand(1, 2, 4, 4).contiguous())
    assert (quantizer.codebook[code] - target).norm() < 0.1 * before


def test_dead_codes_are_restarted_so_the_whole_codebook_is_used():
    """The original's fault: a codebook far from the data keeps almost all codes dead."""
    torch.manual_seed(0)
    quantizer = VectorQuantizer(64, 4)
    quantizer(torch.randn(1, 4, 2, 2))           # data init from only 4 vectors: 60 duplicates
    used = torch.zeros(64, dtype=torch.bool)
    for step in range(60):
        _, indices, _ = quantizer(5 + torch.randn(4, 4, 8, 8))   # data moved far away
        if step >= 50:
            used[indices.unique()] = True
    assert used.float().mean() > 0.9


def test_codebook_stats_on_known_counts():
    stats = codebook_stats(torch.tensor([[2.0, 2.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]))
    assert stats["active_share"] == 0.5 and stats["perplexity"] == pytest.approx(2.0)
    assert codebook_stats(torch.ones(8))["perplexity"] == pytest.approx(8.0)


def test_code_histogram_is_read_untransposed():
    """Position (row r, column c) of a 4 x 6 grid only ever used code 6 r + c: every draw
    must return exactly that grid (a transposed read would not even have the right shape)."""
    histogram = F.one_hot(torch.arange(24).view(4, 6), 24).float()
    drawn = VQVAE.sample_code_indices(histogram, 5)
    assert drawn.shape == (5, 4, 6)
    assert torch.equal(drawn, torch.arange(24).view(1, 4, 6).expand(5, 4, 6))


def test_sampling_follows_the_per_position_histogram():
    torch.manual_seed(0)
    histogram = torch.zeros(2, 2, 3)
    histogram[0, 1] = torch.tensor([1.0, 3.0, 0.0])
    histogram[0, 0, 2] = histogram[1, 0, 0] = histogram[1, 1, 1] = 1.0
    drawn = VQVAE.sample_code_indices(histogram, 4000)
    assert (drawn[:, 0, 1] == 1).float().mean() == pytest.approx(0.75, abs=0.03)
    assert (drawn[:, 0, 1] == 2).sum() == 0 and (drawn[:, 0, 0] == 2).all()


# ----------------------------------------------------------------------------- the original's full size
def test_gpu_preset_is_the_original_full_size():
    """config/pre_train_oasis_gpu.py applied to pre_train.py's constants builds the original's
    ~17.7M-parameter VQVAE (factor 16: 16x16 latents at 256x256) and its 30x30 PatchGAN."""
    import pre_train
    namespace = {name: getattr(pre_train, name) for name in util.config_names(vars(pre_train))}
    config = util.apply_overrides(namespace, [os.path.join(ROOT, "config", "pre_train_oasis_gpu.py")])
    model = build_model(config)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - 17.7e6) / 17.7e6 < 0.10
    assert model.latent_shape(config["IMG_SIZE"]) == (8, 16, 16) and model.num_codes == 256
    discriminator = PatchDiscriminator(base_channels=config["DISC_CHANNELS"], num_layers=config["DISC_LAYERS"])
    with torch.no_grad():
        assert discriminator(torch.zeros(1, 1, 256, 256), torch.tensor([4])).shape == (1, 1, 30, 30)
        assert model(torch.zeros(1, 1, 32, 32), torch.tensor([4]))[0].shape == (1, 1, 32, 32)


@pytest.mark.parametrize("preset, latent_grid", [("gpu", 16), (None, 32)])
def test_second_stage_presets_model_their_first_stage(preset, latent_grid):
    """config/*_<preset>.py (None: the scripts' own CPU constants, as `make` runs them): the
    prior, the diffusion and predict.py read the run that pre_train.py trains with that preset,
    whose latent grid is latent_grid x latent_grid."""
    def preset_config(script):
        module = importlib.import_module(script)
        namespace = {name: getattr(module, name) for name in util.config_names(vars(module))}
        presets = [os.path.join(ROOT, "config", f"{script}_{preset}.py")] if preset else []
        return util.apply_overrides(namespace, presets)

    first_stage = preset_config("pre_train")
    latent_shape = build_model(first_stage).latent_shape(first_stage["IMG_SIZE"])
    assert latent_shape[1:] == (latent_grid, latent_grid)
    run_name = first_stage["RUN_NAME"] or first_stage["MODE"].lower()
    for script in ("train_viT", "stable_diffusion", "predict"):
        assert preset_config(script)["FIRST_STAGE"] == run_name, script
    # the second stage's patches and levels fit that grid (each raises a UserError where they do not)
    model_prior.prior_args(preset_config("train_viT"), first_stage["NUM_CODES"], latent_shape[1:])
    model_diffusion.unet_args(preset_config("stable_diffusion"), latent_shape)


# ----------------------------------------------------------------------------- GAN losses
def test_hinge_loss_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # relu(1 - real) = [0, 0.5] -> 0.25; relu(1 + fake) = [0, 1] -> 0.5
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.25 * (0.25 + 0.5))
    assert hinge_discriminator_loss(real, fake, fake).item() == pytest.approx(0.25 * (0.25 + 1.0))


def test_adaptive_weight_is_the_gradient_norm_ratio():
    weight = torch.tensor([1.0, -2.0], requires_grad=True)
    rec_loss, gan_loss = (3 * weight).sum(), (weight ** 2).sum()     # grads (3, 3) and (2, -4)
    expected = (18 ** 0.5) / (20 ** 0.5 + 1e-4)
    assert adaptive_gan_weight(rec_loss, gan_loss, weight).item() == pytest.approx(expected)
    assert adaptive_gan_weight(rec_loss, 0 * gan_loss, weight, max_weight=100.0).item() == 100.0
