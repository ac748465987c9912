"""The whole pipeline, stage by stage: the commands of a Makefile target, as `make -n` lists them
(so the stages are the Makefile's own), run one by one and timed; then a table of the stage
times beside the test figures of the summaries each stage wrote (log/*_summary.json), and the
realism tables it wrote (log/*_realism.json), as predict.py prints them.

    .venv/bin/python bench/pipeline.py                  # `make`: the CPU presets, demo brains (22-64 min on 2 cores)
    .venv/bin/python bench/pipeline.py --TARGET=gpu     # `make gpu`: the GPU presets at 256x256
    python3 bench/pipeline.py --TARGET=gpu --MAKE_ARGUMENTS='("PY=python3", "-o", ".venv/.runtime-installed")'
                                                        # a machine whose python3 has the packages, no .venv

A stage's time is its process's wall clock, start-up and imports included. The first stage that
fails stops the run, naming its command.
"""
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import realism  # noqa: E402
import util  # noqa: E402

# ----------------------------------------------------------------------------- config
TARGET = "demo"              # the Makefile target: "demo" (what `make` runs) or "gpu"
MAKE_ARGUMENTS = ()          # more arguments for make, e.g. ("DATA_DIR=/data/oasis",)
LOG_DIR = "log"              # where the scripts write their summaries and realism tables (their default)


def stage_commands():
    """The commands `make TARGET` would run, in order."""
    # not a calling make's flags (under `make test`: its directory messages, which would read as commands)
    environment = {name: value for name, value in os.environ.items()
                   if name not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    listing = subprocess.run(["make", "-n", TARGET, *MAKE_ARGUMENTS], cwd=ROOT, env=environment, capture_output=True,
                             text=True)
    if listing.returncode:
        raise util.UserError(f"TARGET {TARGET!r}: `make -n {TARGET}` failed: {listing.stderr.strip()}")
    return [line.strip() for line in listing.stdout.splitlines() if line.strip()]


def stage_name(command):
    """The command without its interpreter: `.venv/bin/python pre_train.py ...` -> `pre_train.py ...`."""
    interpreter, _, rest = command.partition(" ")
    return rest if os.path.basename(interpreter).startswith("python") and rest else command


def written_since(pattern, start):
    """Files matching LOG_DIR/pattern written at or after `start` (a time.time())."""
    paths = glob.glob(os.path.join(ROOT, LOG_DIR, pattern))
    return sorted(path for path in paths if os.path.getmtime(path) >= start)


def summary_figures(path):
    """'run: name value, ...' for the numeric test_* entries of a summary."""
    with open(path) as f:
        summary = json.load(f)
    figures = ", ".join(f"{name.removeprefix('test_')} {value:.4g}" for name, value in summary.items()
                        if name.startswith("test_") and isinstance(value, (int, float)))
    return f"{os.path.basename(path).removesuffix('_summary.json')}: {figures}"


if __name__ == "__main__":
    util.apply_overrides(globals())
    commands = stage_commands()
    timings, realism_paths, run_start = [], [], time.time()
    for command in commands:
        print(f"\n=== {command}", flush=True)
        start = time.time()
        if subprocess.run(command, shell=True, cwd=ROOT).returncode:
            raise util.UserError(f"stage failed after {time.time() - start:.0f} s: {command}")
        timings.append((command, time.time() - start, [summary_figures(path)
                                                        for path in written_since("*_summary.json", start)]))
        realism_paths += written_since("*_realism.json", start)
    total = time.time() - run_start

    print(f"\n`make {' '.join((TARGET, *MAKE_ARGUMENTS))}`, stage by stage")
    print(f"{'stage':64s} {'seconds':>8s}  test figures")
    for command, seconds, figures in timings:
        print(f"{stage_name(command)[:64]:64s} {seconds:8.1f}  " + "; ".join(figures))
    print(f"{'all':64s} {total:8.1f}  ({int(total // 60)} min {total % 60:.0f} s)")
    for path in dict.fromkeys(realism_paths):
        with open(path) as f:
            print(f"\n{os.path.relpath(path, ROOT)}\n{realism.format_table(json.load(f))}")
