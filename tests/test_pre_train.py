"""pre_train.py end to end on tiny real data: 2 demo brains (64 slices) at 32x32, a tiny model."""
import json
import os
import runpy
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from scipy import ndimage

import dataset
import realism
import util
from conftest import assert_within_eager_spread
from logger import PANELS, read_log
from model_discriminator import build_discriminator
from model_VAE import build_model
from module import code_counts_per_position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--IMG_SIZE=32", "--BASE_CHANNELS=16", "--CHANNEL_MULTS=(1, 2)", "--PATCH_SIZE=2",
        "--NUM_CODES=32", "--CODE_DIM=4", "--LATENT_CHANNELS=4", "--DISC_CHANNELS=8", "--DISC_LAYERS=2",
        "--BATCH_SIZE=8", "--GAN_START_STEP=4", "--LR=1e-3",
        "--DETAIL_WEIGHT=0.0",  # off: in 32 steps at 32x32 it held L1 back (the loss has its own tests below)
        "--USE_BF16=False"]   # fp32 on every CPU: bf16 where a CPU has it would give each machine its own figures


def arguments(demo_dir, out_dir, *extra):
    return TINY + [f"--DATA_DIR={demo_dir}", f"--CKPT_DIR={out_dir}/ckpt", f"--LOG_DIR={out_dir}/log",
                   f"--VISUALIZE_DIR={out_dir}/visualize", *extra]


def run_pre_train(monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", ["pre_train.py"] + argv)
    runpy.run_path(os.path.join(ROOT, "pre_train.py"), run_name="__main__")


def load_last(out_dir, run="vqvae"):
    return util.load_checkpoint(os.path.join(out_dir, "ckpt", f"{run}_last.pt"))


def test_vqvae_training_improves_and_writes_everything(demo_dir, tmp_path, monkeypatch):
    """What it learns is checked in test_second_stage.py (the first stage beats the per-z average slice)."""
    run_pre_train(monkeypatch, arguments(demo_dir, tmp_path, "--EPOCHS=4"))
    log = read_log(str(tmp_path / "log" / "vqvae.log"))
    rec = log["rec_loss"][1]
    assert len(rec) == 4 * 8
    assert rec[-5:].mean() < 0.6 * rec[:5].mean()
    assert log["val_ssim"][1][-1] > log["val_ssim"][1][0]
    # GAN terms exactly from GAN_START_STEP on
    assert log["g_loss"][0].min() == 4 and log["d_loss"][0].min() == 4
    assert len(log["g_random_loss"][1]) == len(rec) - 4
    summary = json.loads((tmp_path / "log" / "vqvae_summary.json").read_text())
    assert summary["test_codebook_usage"] > 0.5 and summary["steps"] == 32
    best = util.load_checkpoint(str(tmp_path / "ckpt" / "vqvae_best.pt"))
    assert best["epoch"] == summary["best_epoch"] and best["code_histogram"].shape == (8, 8, 32)
    assert load_last(tmp_path)["epoch"] == 4
    pictures = os.listdir(tmp_path / "visualize")
    assert "vqvae_reconstruction_epoch004.png" in pictures and "vqvae_samples_epoch004.png" in pictures


def test_bf16_autocast_by_default_exactly_where_the_cpu_has_bf16(demo_dir, tmp_path, monkeypatch):
    default_precision = [arg for arg in arguments(demo_dir, tmp_path, "--EPOCHS=1") if not arg.startswith("--USE_BF16")]
    run_pre_train(monkeypatch, default_precision)
    summary = json.loads((tmp_path / "log" / "vqvae_summary.json").read_text())
    assert summary["bf16_autocast"] == util.cpu_has_bf16()
    assert np.isfinite(read_log(str(tmp_path / "log" / "vqvae.log"))["rec_loss"][1]).all()


def test_vae_mode_anneals_kl(demo_dir, tmp_path, monkeypatch):
    run_pre_train(monkeypatch, arguments(demo_dir, tmp_path, "--MODE=VAE", "--EPOCHS=1", "--KL_CYCLE_STEPS=4"))
    log = read_log(str(tmp_path / "log" / "vae.log"))
    assert np.allclose(log["kl_weight"][1] / 1e-6, [0.5, 0.625, 0.75, 0.875] * 2)
    assert "test_codebook_usage" not in json.loads((tmp_path / "log" / "vae_summary.json").read_text())


def test_resumed_run_equals_uninterrupted_run(demo_dir, tmp_path, monkeypatch):
    run_pre_train(monkeypatch, arguments(demo_dir, tmp_path / "straight", "--EPOCHS=2"))
    with monkeypatch.context() as interrupt:   # Ctrl-C as the second epoch starts
        def stop_at_second_epoch(sampler, epoch):
            if epoch == 1:
                raise KeyboardInterrupt
            sampler.epoch = epoch
        interrupt.setattr(torch.utils.data.DistributedSampler, "set_epoch", stop_at_second_epoch)
        with pytest.raises(KeyboardInterrupt):
            run_pre_train(monkeypatch, arguments(demo_dir, tmp_path / "resumed", "--EPOCHS=2"))
    assert load_last(tmp_path / "resumed")["epoch"] == 1
    run_pre_train(monkeypatch, arguments(demo_dir, tmp_path / "resumed", "--EPOCHS=2"))
    straight, resumed = load_last(tmp_path / "straight"), load_last(tmp_path / "resumed")
    log_straight = read_log(str(tmp_path / "straight" / "log" / "vqvae.log"))
    log_resumed = read_log(str(tmp_path / "resumed" / "log" / "vqvae.log"))
    if not torch.cuda.is_available():            # on CPU: bit for bit
        for name in ("model", "discriminator"):
            for key, tensor in straight[name].items():
                assert torch.equal(tensor, resumed[name][key]), f"{name}.{key} differs after resuming"
        assert np.array_equal(log_straight["rec_loss"][1], log_resumed["rec_loss"][1])
        return
    # CUDA's atomics make two identical runs differ slightly: resuming must differ no more than that
    run_pre_train(monkeypatch, arguments(demo_dir, tmp_path / "again", "--EPOCHS=2"))
    again = load_last(tmp_path / "again")
    for name in ("model", "discriminator"):
        for key, tensor in straight[name].items():
            noise = (tensor.float() - again[name][key].float()).abs().max().item()
            assert (tensor.float() - resumed[name][key].float()).abs().max().item() <= 4 * noise + 1e-4, key
    assert np.allclose(log_straight["rec_loss"][1], log_resumed["rec_loss"][1], rtol=0.02)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_steps_train_as_eager_steps_do(demo_dir, tmp_path, monkeypatch):
    """On a GPU pre_train.py replays its steps as CUDA graphs, one per phase (here the GAN's from
    step 4): the same training as eager steps, within the spread of two eager runs (CUDA's atomics)."""
    for run, graphs in (("graphed", True), ("eager", False), ("eager_again", False)):
        run_pre_train(monkeypatch, arguments(demo_dir, tmp_path / run, "--EPOCHS=2", f"--CUDA_GRAPHS={graphs}"))
    assert_within_eager_spread(*(load_last(tmp_path / run) for run in ("graphed", "eager", "eager_again")),
                               ("model", "discriminator"))
    logs = [read_log(str(tmp_path / run / "log" / "vqvae.log")) for run in ("graphed", "eager")]
    for term in ("rec_loss", "g_loss", "d_loss"):
        assert np.allclose(logs[0][term][1], logs[1][term][1], rtol=0.02), term


def test_checkpoint_from_another_config_is_refused(demo_dir, tmp_path, monkeypatch):
    run_pre_train(monkeypatch, arguments(demo_dir, tmp_path, "--EPOCHS=1"))
    with pytest.raises(util.UserError, match="(?s)another config.*BASE_CHANNELS: checkpoint 16, script 8"):
        run_pre_train(monkeypatch, arguments(demo_dir, tmp_path, "--EPOCHS=2", "--BASE_CHANNELS=8"))


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(demo_dir, tmp_path, monkeypatch):
    run_pre_train(monkeypatch, arguments(demo_dir, tmp_path, "--EPOCHS=1"))
    real_l1 = torch.nn.functional.l1_loss
    calls = []

    def l1_turning_nan(*args, **kwargs):
        calls.append(1)
        loss = real_l1(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(torch.nn.functional, "l1_loss", l1_turning_nan)
    with pytest.raises(FloatingPointError, match="step 10: rec_loss is nan"):
        run_pre_train(monkeypatch, arguments(demo_dir, tmp_path, "--EPOCHS=2"))
    assert load_last(tmp_path)["epoch"] == 1


def test_torchrun_two_processes_train_and_resume_as_one_run(demo_dir, tmp_path):
    """Two CPU processes (gloo), GPU or not; a run stopped as its second epoch (the GAN's) starts
    and resumed ends bit for bit where the uninterrupted one does: each process gets its own
    generators back, though only the main one validated and drew pictures."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    stopping = tmp_path / "stop_at_second_epoch.py"       # Ctrl-C in both processes as epoch 2 starts
    stopping.write_text(f"import runpy, sys, torch\nsys.path.insert(0, {ROOT!r})\n"
                        "def set_epoch(sampler, epoch):\n    if epoch == 1:\n        raise KeyboardInterrupt\n"
                        "    sampler.epoch = epoch\ntorch.utils.data.DistributedSampler.set_epoch = set_epoch\n"
                        f"runpy.run_path({os.path.join(ROOT, 'pre_train.py')!r}, run_name='__main__')\n")

    def torchrun(script, out_dir):
        # --standalone: rendezvous on a free port (a fixed one can be taken on a shared machine)
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                               str(script), *arguments(demo_dir, out_dir, "--EPOCHS=2")],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    result = torchrun(os.path.join(ROOT, "pre_train.py"), tmp_path / "straight")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stderr, result.stderr[-3000:]      # e.g. DDP's on gradient strides
    summary = json.loads((tmp_path / "straight" / "log" / "vqvae_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 8   # 2 x 64 slices / (2 processes x 8)
    assert torchrun(stopping, tmp_path / "resumed").returncode != 0
    assert load_last(tmp_path / "resumed")["epoch"] == 1
    result = torchrun(os.path.join(ROOT, "pre_train.py"), tmp_path / "resumed")
    assert result.returncode == 0, result.stderr[-3000:]
    straight, resumed = load_last(tmp_path / "straight"), load_last(tmp_path / "resumed")
    for name in ("model", "discriminator"):
        for key, tensor in straight[name].items():
            assert torch.equal(tensor, resumed[name][key]), f"{name}.{key} differs after resuming"


def test_killed_run_resumes_from_the_last_complete_checkpoint(demo_dir, tmp_path, monkeypatch):
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "pre_train.py"),
                                *arguments(demo_dir, tmp_path, "--EPOCHS=50")],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "ckpt" / "vqvae_last.pt"
    try:
        deadline = time.time() + 120
        while not last.exists() and time.time() < deadline and process.poll() is None:
            time.sleep(0.05)
        time.sleep(0.5)                  # now somewhere inside a later epoch, or a save
    finally:
        process.kill()
        process.wait()
    epoch_at_kill = load_last(tmp_path)["epoch"]
    assert 1 <= epoch_at_kill < 50
    run_pre_train(monkeypatch, arguments(demo_dir, tmp_path, f"--EPOCHS={epoch_at_kill + 1}"))
    assert load_last(tmp_path)["epoch"] == epoch_at_kill + 1
    steps = read_log(str(tmp_path / "log" / "vqvae.log"))["rec_loss"][0]
    assert np.array_equal(steps, np.arange(8 * (epoch_at_kill + 1)))   # no steps lost or doubled


def test_code_counts_per_position_against_one_hot():
    import pre_train
    indices = torch.randint(0, 7, (5, 3, 4), generator=torch.Generator().manual_seed(0))
    counts = code_counts_per_position(indices, 7)
    assert counts.shape == (3, 4, 7)
    assert torch.equal(counts, torch.nn.functional.one_hot(indices, 7).sum(0))


def detail_energy_reference(reconstructions, images, window):
    """pre_train.detail_energy_loss in NumPy: the mean |difference| of the RMS of each image's
    Laplacian (edges repeated) over window x window blocks."""
    def block_rms(batch):
        energy = np.stack([ndimage.laplace(image[0].astype(np.float64), mode="nearest") ** 2 for image in batch])
        n, h, w = energy.shape
        blocks = energy.reshape(n, h // window, window, w // window, window).mean((2, 4))
        return np.sqrt(blocks + 1e-8)
    return np.abs(block_rms(reconstructions) - block_rms(images)).mean()


def test_detail_energy_loss_gives_a_blurred_image_its_detail_back():
    """Zero against the image itself, the NumPy reference against the image blurred, and a
    gradient step on the blurred image raises its detail energy."""
    import pre_train
    torch.manual_seed(0)
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    window = pre_train.DETAIL_WINDOW
    inside = (slice(None), slice(None), slice(1, -1), slice(1, -1))   # away from the border the Laplacian reads
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False).requires_grad_()
    loss = pre_train.detail_energy_loss(blurred, images)
    assert loss.item() == pytest.approx(detail_energy_reference(blurred.detach().numpy(), images.numpy(), window),
                                        rel=1e-5)
    assert pre_train.detail_energy_loss(images, images).item() == 0
    assert loss.item() > 0.05
    loss.backward()
    energy_before = realism.laplacian(blurred.detach())[inside].pow(2).mean()
    energy_after = realism.laplacian(blurred.detach() - 0.1 * blurred.grad / blurred.grad.abs().max())[inside].pow(2).mean()
    assert energy_after > energy_before


@pytest.mark.parametrize("mode", ["VQVAE", "VAE"])
def test_generator_loss_is_the_sum_of_its_terms(demo_dir, mode, monkeypatch):
    """The loss that is optimised, not the one logged: L1 + the VQ commitment loss or the
    weighted KL + the weighted GAN terms, recomputed here from the same random draws."""
    import pre_train
    from model_discriminator import adaptive_gan_weight
    # weights at which every term is far above float rounding, so a dropped one shows
    for name, value in {"KL_WEIGHT": 0.01, "GAN_WEIGHT": 1.0, "DETAIL_WEIGHT": 0.5, "IMG_SIZE": 32,
                        "RANDOM_LATENTS": 2}.items():
        monkeypatch.setattr(pre_train, name, value)
    config = {name: getattr(pre_train, name) for name in util.config_names(vars(pre_train))}
    config.update(MODE=mode, BASE_CHANNELS=16, CHANNEL_MULTS=(1, 2), NUM_CODES=32, CODE_DIM=4, LATENT_CHANNELS=4,
                  DISC_CHANNELS=8)
    torch.manual_seed(0)
    model = build_model(config).eval()        # eval: the codebook stays put between the two passes
    discriminator = build_discriminator(config)
    slices = dataset.OasisSlices("train", demo_dir, 32)
    chosen = [3, 10, 17, 24]
    images, zs = torch.stack([slices[i][0] for i in chosen]), torch.from_numpy(slices.zs[chosen])
    histogram, step = torch.ones(*model.latent_shape(32)[1:], 32), pre_train.GAN_START_STEP + 100
    torch.manual_seed(1)
    total, losses, _, _, _ = pre_train.generator_loss(model, model, discriminator, images, zs,
                                                      pre_train.kl_weight(step), True, histogram)

    torch.manual_seed(1)            # the VAE's posterior sample, then the random latents, as above
    reconstruction, regulariser, _ = model(images, zs)
    generated = model.decode(pre_train.random_latents(model, histogram, 2, "cpu"), zs[:2])   # RANDOM_LATENTS
    rec_loss = (reconstruction - images).abs().mean()
    g_loss, g_random_loss = -discriminator(reconstruction, zs).mean(), -discriminator(generated, zs[:2]).mean()
    gan_term = adaptive_gan_weight(rec_loss, g_loss, model.last_layer_weight) * (g_loss + g_random_loss)
    regulariser_term = regulariser * (1.0 if mode == "VQVAE" else pre_train.kl_weight(step))
    detail_term = 0.5 * detail_energy_reference(reconstruction.detach().numpy(), images.numpy(), pre_train.DETAIL_WINDOW)
    assert min(regulariser_term.item(), abs(gan_term.item()), detail_term) > 0.01 * rec_loss.item()
    assert total.item() == pytest.approx((rec_loss + regulariser_term + gan_term).item() + detail_term, rel=1e-5)
    assert losses["rec_loss"].item() == pytest.approx(rec_loss.item(), rel=1e-5)
    assert set(losses) <= {name for names in PANELS.values() for name in names}     # every logged term is plotted
