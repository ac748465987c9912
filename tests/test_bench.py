"""bench/pipeline.py on a stand-in Makefile: stages timed in the Makefile's order, each beside the
test figures of the summaries it wrote, realism tables printed, a failing stage named."""
import glob
import os
import re
import runpy
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MAKEFILE = """\
demo:
\t{python} -c "import json, time; time.sleep(0.3); json.dump({{'test_ssim': 0.9123, 'epochs': 3}}, open('{log}/first_summary.json', 'w'))"
\t{python} -c "import json; json.dump({{'real_test': {{'frechet_distance': 0.0, 'sharpness': 1.0, 'memorisation_by_chance': 0.11}}, 'sources': {{'DDIM-50': {{'figures': {{'frechet_distance': 0.25, 'sharpness': 1.08}}, 'spread': {{'frechet_distance': 0.03}}}}}}}}, open('{log}/first_realism.json', 'w'))"

broken:
\t{python} -c "print('fine')"
\t{python} -c "raise SystemExit(3)"
\t{python} -c "print('never reached')"
"""


def run_pipeline(tmp_path, target):
    log = tmp_path / "log"
    log.mkdir(exist_ok=True)
    (tmp_path / "Makefile").write_text(MAKEFILE.format(python=sys.executable, log=log))
    return subprocess.run([sys.executable, "bench/pipeline.py", f"--TARGET={target}", f"--LOG_DIR={log}",
                           f"--MAKE_ARGUMENTS=('-f', '{tmp_path / 'Makefile'}')"],
                          cwd=ROOT, capture_output=True, text=True)


def test_pipeline_times_each_stage_beside_its_figures(tmp_path):
    result = run_pipeline(tmp_path, "demo")
    assert result.returncode == 0, result.stderr
    table = result.stdout[result.stdout.index("stage by stage"):].splitlines()
    first, second, total = table[2], table[3], table[4]
    assert "time.sleep(0.3)" in first and "first: ssim 0.9123" in first and "epochs" not in first
    assert "json.dump({'real_test'" in second and "ssim" not in second     # no summary written there
    assert float(first.split()[-4]) >= 0.3                         # its seconds, before "first: ssim 0.9123"
    assert "first_realism.json" in result.stdout
    assert total.startswith("all")
    realism_row = next(line for line in table if line.startswith("DDIM-50"))      # as predict.py prints it
    assert realism_row.split()[1:] == ["0.250", "+-0.030", "1.08"]


def test_pipeline_stops_at_the_failing_stage_and_names_it(tmp_path):
    result = run_pipeline(tmp_path, "broken")
    assert result.returncode != 0
    assert "stage failed" in result.stderr and "raise SystemExit(3)" in result.stderr
    assert "fine" in result.stdout and "never reached" not in result.stdout


def test_nifti_frame_scores_a_sampler_that_draws_the_real_brains_as_the_real_brains(demo_dir, tmp_path):
    """A "sampler" whose volumes are the real test brains, written as predict.py writes its own:
    its Dice with the template's brain mask is the real brains' own, and flipping their rows (a
    wrong frame) lowers it."""
    import dataset
    real = dataset.OasisSlices("test", demo_dir, 32).volumes()
    dataset.write_volumes(str(tmp_path / "generated" / "copies"), real, {"kind": "real test brains"}, "VOLUMES_DIR",
                          frame=dataset.data_frame(demo_dir))
    result = subprocess.run([sys.executable, "bench/nifti_frame.py", f"--VOLUMES_DIR={tmp_path / 'generated'}",
                             f"--DATA_DIR={demo_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line[:32].strip(): line[32:].split() for line in result.stdout.splitlines()[-3:]}
    assert list(rows) == ["real test", "copies", "real test, rows flipped"]
    assert rows["copies"] == rows["real test"] and rows["copies"][0] == "1"
    assert 0.8 < float(rows["copies"][1]) and float(rows["real test, rows flipped"][1]) < float(rows["copies"][1]) - 0.01


def test_scan_frame_lays_a_scored_brain_over_its_own_scan_not_the_template(tmp_path):
    """A scan 12 mm right of the template's place, converted with alignment and written as
    score_scans.py --VOLUMES_DIR writes it: its brain lies over the scan's brain in its own frame,
    worse in the template's frame, and worse again with its rows flipped."""
    import dataset
    from test_dataset import write_small_volume
    scans = dataset.convert_nifti([write_small_volume(tmp_path / "moved.nii.gz", right_mm=12)],
                                  str(tmp_path / "my_scans"), "test")
    folder = dataset.write_volumes(str(tmp_path / "scored" / "vqvae_scans_my_scans_scored"),
                                   dataset.OasisSlices("test", scans, 32).volumes(),
                                   {"kind": "your brains scored", "data_dir": scans}, "VOLUMES_DIR",
                                   frame=dataset.data_frame(scans), brain_frames=dataset.brain_frames(scans))
    result = subprocess.run([sys.executable, "bench/scan_frame.py", f"--FOLDER={folder}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    brain, name, own, template, flipped = result.stdout.splitlines()[-1].split()
    assert (brain, name) == ("1", "moved.nii.gz")
    assert float(own) > 0.9 and float(template) < float(own) - 0.03 and float(flipped) < float(own) - 0.03


def run_bench_here(script, argv, monkeypatch):
    """bench/<script> run in this process (its imports are this process's already), with nothing
    it could start: a subprocess it launched would fail the test at once. pre_train.py's constants,
    which first_stage_speed.py sets to its preset's, are put back afterwards for the other tests."""
    import pre_train
    import util
    for name in util.config_names(vars(pre_train)):
        monkeypatch.setattr(pre_train, name, getattr(pre_train, name))
    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"bench/{script} started {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))     # as python puts a script's folder first
    runpy.run_path(os.path.join(ROOT, "bench", script), run_name="__main__")


@pytest.mark.parametrize("script", sorted(os.path.basename(path) for path in glob.glob(os.path.join(ROOT, "bench", "*.py"))))
def test_every_bench_script_answers_help_and_runs_nothing(script, monkeypatch, capsys):
    """`--help` lists the constants and exits: first_stage_quality.py once took it for nothing
    and began deleting and retraining its runs."""
    with pytest.raises(SystemExit) as exit_status:
        run_bench_here(script, ["--help"], monkeypatch)
    assert exit_status.value.code == 0 and "constants (--NAME=value" in capsys.readouterr().out


def test_speed_race_refuses_contestants_of_other_latent_grids(monkeypatch):
    import util
    with pytest.raises(util.UserError, match=re.escape("latent grids at 64x64 differ ('ours, z' 16x16; "
                                                       "'ours, z, 4x4 patches' 4x4)")):
        run_bench_here("first_stage_speed.py", ["--CONTESTANT_NAMES=('ours, z', 'ours, z, 4x4 patches')"], monkeypatch)


def test_speed_race_reports_a_failing_contestant_and_races_the_others(monkeypatch, capsys):
    """A contestant that fails while its learning rates are tuned (here MONAI's discriminator with
    more stride-2 layers than a 64x64 slice has room for) says why; the race goes on without it."""
    run_bench_here("first_stage_speed.py", [
        "--CONTESTANT_NAMES=('MONAI, no z', 'ours, no z')", "--MONAI_DISC_LAYERS=5", "--LEARNING_RATES=(1e-3, 2e-3)",
        "--TUNE_SECONDS=0.5", "--BUDGET_SECONDS=0.5", "--WARMUP_STEPS=1", "--BATCH_SIZE=4"], monkeypatch)
    printed = capsys.readouterr().out
    assert re.search(r"^MONAI, no z: failed: .*Kernel size can't be greater than actual input size", printed,
                     re.MULTILINE)
    table = printed.split(f"\n{'model':36s} ")[1].splitlines()[1:]
    assert [row[:36].rstrip() for row in table] == ["ours, no z"]
