"""Quality of the default CPU first stage on the demo brains: trains VQVAE and VAE from scratch
as `make` does (runs named bench_vqvae / bench_vae; earlier ones are deleted) and
prints test SSIM, codebook usage on the test split, training images/s and wall time.

    .venv/bin/python bench/first_stage_quality.py [--MODES="('VQVAE',)"]
"""
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import util  # noqa: E402

# ----------------------------------------------------------------------------- config
MODES = ("VQVAE", "VAE")     # the first stages to train, each with the preset `make` trains it with
PRESETS = {"VQVAE": [], "VAE": ["config/pre_train_vae.py"]}

if __name__ == "__main__":
    util.apply_overrides(globals())
    unknown = [mode for mode in MODES if mode not in PRESETS]
    if unknown:
        raise util.UserError(f"MODES: unknown {unknown}; expected some of {tuple(PRESETS)}")
    rows = []
    for mode in MODES:
        preset = PRESETS[mode]
        run = f"bench_{mode.lower()}"
        for path in glob.glob(os.path.join(ROOT, "model_ckpt", f"{run}_*.pt")):
            os.remove(path)
        start = time.time()
        if subprocess.run([sys.executable, "pre_train.py", *preset, f"--MODE={mode}", f"--RUN_NAME={run}"],
                          cwd=ROOT).returncode:
            raise SystemExit(f"pre_train.py --MODE={mode} failed (its message is above)")
        wall = time.time() - start
        with open(os.path.join(ROOT, "log", f"{run}_summary.json")) as f:
            summary = json.load(f)
        rows.append((mode, summary, wall))

    print(f"\n{'model':6s} {'test SSIM':>9s} {'best epoch':>10s} {'codes active (test)':>20s} "
          f"{'perplexity':>10s} {'train img/s':>11s} {'train s':>8s} {'wall s':>7s}")
    for mode, summary, wall in rows:
        usage, perplexity = summary.get("test_codebook_usage"), summary.get("test_perplexity")
        print(f"{mode:6s} {summary['test_ssim']:9.4f} {summary['best_epoch']:10d} "
              f"{'-' if usage is None else f'{usage:.1%}':>20s} "
              f"{'-' if perplexity is None else f'{perplexity:.1f}':>10s} "
              f"{summary['train_images_per_second']:11.1f} {summary['train_seconds']:8.0f} {wall:7.0f}")
