"""Training logs in log/ and their plots.

A log is a text file of `name|value` lines, the original repo's format: each training step
starts with a `step|N` line, then one line per logged value. `python logger.py [run]` plots a
run's log (default: every log in log/) to visualize/<run>_curves.png; it can be run while the
training is still writing.
"""
import os
import sys
from collections import defaultdict

import numpy as np

# ----------------------------------------------------------------------------- config
LOG_DIR = "log"
SMOOTHING = 5              # moving-average window of the plotted curves (1: as logged)

# the original's four panels (its balancing weights apart: the KL weight is ~1e-6, the adaptive
# GAN weight ~1e-2, and one axis would flatten the annealing), codebook usage and validation SSIM
# (first stage); the second stage's training and validation losses; the brain critic's terms and
# validation scores
PANELS = {
    "reconstruction": ("rec_loss", "detail_loss"),
    "regulariser": ("vq_loss", "kl_loss"),
    "GAN terms": ("g_loss", "g_random_loss", "d_loss"),
    "adaptive GAN weight": ("adaptive_weight",),
    "KL weight (cyclical annealing)": ("kl_weight",),
    "codebook usage": ("codebook_usage", "perplexity_share"),
    "validation SSIM": ("val_ssim",),
    "training loss": ("train_loss",),
    "validation loss": ("val_loss",),
    "critic terms": ("z_loss", "seg_loss"),
    "critic validation": ("val_z_within_2", "val_dice_CSF", "val_dice_GM", "val_dice_WM"),
}


class TrainingLog:
    """Appends `name|value` lines to log/<run>.log. Resuming from a checkpoint taken after
    `resume_step` steps (0 .. resume_step - 1) first drops whatever a killed run wrote for later
    steps, so the log always matches the weights it belongs to."""

    def __init__(self, path, resume_step=None):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_step is None:
            open(path, "w").close()
        elif os.path.exists(path):
            kept = []
            with open(path) as f:
                for line in f:
                    if line.startswith("step|") and int(line.split("|")[1]) >= resume_step:
                        break
                    kept.append(line)
            with open(path, "w") as f:
                f.writelines(kept)
        self.file = open(path, "a")

    def write(self, step, values):
        self.file.write(f"step|{step}\n" + "".join(f"{k}|{float(v):.6g}\n" for k, v in values.items()))
        self.file.flush()

    def close(self):
        self.file.close()


def read_log(path):
    """{name: (steps, values)} from a log file; a half-written last line is skipped."""
    series = defaultdict(lambda: ([], []))
    step = 0
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("|")
            if len(parts) != 2 or not line.endswith("\n"):   # a line still being written
                continue
            try:
                value = float(parts[1])
            except ValueError:
                continue
            if parts[0] == "step":
                step = int(value)
            else:
                series[parts[0]][0].append(step)
                series[parts[0]][1].append(value)
    return {name: (np.array(steps), np.array(values)) for name, (steps, values) in series.items()}


def moving_average(values, window):
    if len(values) < window:
        return values
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot_log(path, out_path, smoothing=SMOOTHING):
    """Plot one log's panels (those it has values for) to out_path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    series = read_log(path)
    panels = {title: [n for n in names if n in series] for title, names in PANELS.items()}
    panels = {title: names for title, names in panels.items() if names}
    if not panels:
        raise ValueError(f"log {path} holds no known values yet")
    columns = 3 if len(panels) > 4 else 2
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    for ax, (title, names) in zip(axes.flat, panels.items()):
        for name in names:
            steps, values = series[name]
            window = smoothing if len(values) > 10 * smoothing else 1
            smooth = moving_average(values, window)
            ax.plot(steps[window - 1:], smooth, label=name if window == 1 else f"{name} ({window}-step mean)",
                    marker="o" if len(values) < 50 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(os.path.basename(path))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


if __name__ == "__main__":
    import util
    util.check_single_process()
    options = [a for a in sys.argv[1:] if a.startswith("-") or a.endswith(".py")]
    util.check_positive_ints(util.apply_overrides(globals(), options), ("SMOOTHING",))
    runs = [a for a in sys.argv[1:] if a not in options] \
        or sorted(f[:-4] for f in os.listdir(LOG_DIR) if f.endswith(".log"))
    if not runs:
        raise SystemExit(f"no logs in {LOG_DIR}/; train something first (python pre_train.py)")
    for run in runs:
        path = os.path.join(LOG_DIR, f"{run}.log")
        if not os.path.isfile(path):
            raise SystemExit(f"log {path} does not exist; logs here: {os.listdir(LOG_DIR)}")
        print(plot_log(path, os.path.join("visualize", f"{run}_curves.png"), SMOOTHING))
