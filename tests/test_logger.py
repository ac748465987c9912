import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from logger import TrainingLog, plot_log, read_log


def test_log_round_trip_and_partial_last_line(tmp_path):
    path = str(tmp_path / "run.log")
    log = TrainingLog(path)
    for step in range(3):
        log.write(step, {"rec_loss": 1.0 / (step + 1), "g_loss": -step})
    log.close()
    with open(path, "a") as f:
        f.write("rec_loss|0.2")          # a line the training is still writing
    series = read_log(path)
    assert np.array_equal(series["rec_loss"][0], [0, 1, 2])
    assert np.allclose(series["rec_loss"][1], [1, 0.5, 1 / 3])
    assert np.array_equal(series["g_loss"][1], [0, -1, -2])


def test_resume_drops_what_a_killed_run_wrote_after_the_checkpoint(tmp_path):
    path = str(tmp_path / "run.log")
    log = TrainingLog(path)
    for step in range(10):
        log.write(step, {"rec_loss": step})
    log.close()
    log = TrainingLog(path, resume_step=6)       # checkpoint taken after steps 0 .. 5
    log.write(6, {"rec_loss": 60})
    log.close()
    steps, values = read_log(path)["rec_loss"]
    assert np.array_equal(steps, [0, 1, 2, 3, 4, 5, 6]) and values[-1] == 60


def plotted_panels(monkeypatch, path, out_path):
    """{panel title: {curve label: (x, y)}} of the figure plot_log saves, and the PNG's size."""
    figures, savefig = [], Figure.savefig

    def keep_and_save(figure, *args, **kwargs):
        figures.append(figure)
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep_and_save)
    plot_log(path, out_path)
    panels = {ax.get_title(): {line.get_label(): line.get_data() for line in ax.get_lines()}
              for ax in figures[0].axes if ax.axison}
    return panels, Image.open(out_path).size


def test_plot_draws_each_logged_value_in_its_panel(tmp_path, monkeypatch):
    path = str(tmp_path / "run.log")
    log = TrainingLog(path)
    rng = np.random.default_rng(0)
    for step in range(200):
        values = {"rec_loss": 1 / (step + 1) + 0.01 * rng.random(), "vq_loss": 0.1}
        if step >= 100:
            values.update(g_loss=rng.random(), d_loss=1.0, g_random_loss=0.5, adaptive_weight=0.3)
        log.write(step, values)
        if step % 50 == 49:
            log.write(step, {"val_ssim": 0.5 + step / 400, "codebook_usage": 1.0})
    log.close()
    panels, (width, height) = plotted_panels(monkeypatch, path, str(tmp_path / "curves.png"))
    mean = " (5-step mean)"           # the label of a smoothed curve
    assert {title: sorted(curves) for title, curves in panels.items()} == {
        "reconstruction": ["rec_loss" + mean], "regulariser": ["vq_loss" + mean],
        "GAN terms": ["d_loss" + mean, "g_loss" + mean, "g_random_loss" + mean],
        "adaptive GAN weight": ["adaptive_weight" + mean], "codebook usage": ["codebook_usage"],
        "validation SSIM": ["val_ssim"]}
    assert width > height > 300        # 2 rows x 3 columns of panels
    # long series are drawn as a 5-step moving average, each point at its window's last step
    steps, values = read_log(path)["rec_loss"]
    x, y = panels["reconstruction"]["rec_loss" + mean]
    assert np.array_equal(x, steps[4:]) and np.allclose(y, [values[i - 4:i + 1].mean() for i in range(4, 200)])
    x, y = panels["GAN terms"]["g_loss" + mean]
    assert x[0] == 104 and len(y) == 96
    x, y = panels["validation SSIM"]["val_ssim"]       # short series as they are
    assert np.array_equal(x, [49, 99, 149, 199]) and np.allclose(y, [0.6225, 0.7475, 0.8725, 0.9975])


def test_plot_of_a_second_stage_log(tmp_path, monkeypatch):
    path = str(tmp_path / "prior.log")
    log = TrainingLog(path)
    for step in range(60):
        log.write(step, {"train_loss": 3.0 - step / 30})
        if step % 20 == 19:
            log.write(step, {"val_loss": 3.0 - step / 40})
    log.close()
    panels, _ = plotted_panels(monkeypatch, path, str(tmp_path / "curves.png"))
    assert list(panels) == ["training loss", "validation loss"]
    assert np.allclose(panels["validation loss"]["val_loss"][1], [2.525, 2.025, 1.525])
    assert np.allclose(panels["training loss"]["train_loss (5-step mean)"][1], 3.0 - np.arange(2, 58) / 30)


def test_the_kl_weight_gets_an_axis_of_its_own(tmp_path, monkeypatch):
    """The cyclical KL weight (~1e-6) beside the adaptive GAN weight (~1e-2) on one axis would be
    a flat line at 0: each gets its own panel, whose y range is its own."""
    path = str(tmp_path / "vae.log")
    log = TrainingLog(path)
    for step in range(40):
        log.write(step, {"rec_loss": 0.5, "adaptive_weight": 0.03, "kl_weight": 1e-6 * (0.5 + (step % 8) / 16)})
    log.close()
    figures, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda figure, *a, **k: figures.append(figure) or savefig(figure, *a, **k))
    plot_log(path, str(tmp_path / "curves.png"))
    axes = {ax.get_title(): ax for ax in figures[0].axes if ax.axison}
    kl_axis = axes["KL weight (cyclical annealing)"]
    assert [line.get_label() for line in kl_axis.get_lines()] == ["kl_weight"]
    low, high = kl_axis.get_ylim()
    assert 0.4e-6 < low < 0.5e-6 and 0.93e-6 < high < 1e-6
