import numpy as np
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


def test_plot_has_the_panels_of_the_logged_values(tmp_path):
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
    out = plot_log(path, str(tmp_path / "curves.png"))
    width, height = Image.open(out).size
    assert width > height > 300        # 2 rows x 3 columns of panels
