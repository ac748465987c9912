"""Shared helpers: SSIM, sinusoidal embeddings, seeding, device choice, checkpoints and the
`--NAME=value` / config-file override every script uses."""
import ast
import contextlib
import json
import math
import os
import random
import re
import shlex
import shutil
import sys
import tempfile
import time
import tokenize
import traceback
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm


# ----------------------------------------------------------------------------- Gaussian windows, SSIM
def gaussian_taps(sigma, radius):
    """The normalised 1-D Gaussian of std `sigma` (in taps) at offsets -radius..radius (float32):
    one pass of a separable blur."""
    taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    return taps / taps.sum()


def gaussian_band(size, window_size=11, sigma=1.5):
    """(size, size) matrix B with B @ column = the normalised 1-D Gaussian window's mean around
    each entry, zero padding included (rows near the border just lose the taps outside). The
    2-D window is separable, so B_H @ image @ B_W.T is its local mean at every pixel."""
    taps = torch.exp(-(torch.arange(window_size, dtype=torch.float64) - (window_size - 1) / 2) ** 2 / (2 * sigma ** 2))
    taps = taps / taps.sum()
    offset = torch.arange(size)[None] - torch.arange(size)[:, None] + window_size // 2
    inside = (offset >= 0) & (offset < window_size)
    return torch.where(inside, taps[offset.clamp(0, window_size - 1)], torch.zeros((), dtype=torch.float64)).float()


def _ssim_from_moments(mu1, mu2, var1, var2, covar, data_range=1.0, k1=0.01, k2=0.03):
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return ((2 * mu1 * mu2 + c1) * (2 * covar + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (var1 + var2 + c2))


def ssim_map(img1, img2, window_size=11, sigma=1.5, data_range=1.0, k1=0.01, k2=0.03):
    """Per-pixel SSIM of (B, C, H, W) images. Window statistics are Gaussian-weighted local
    means with zero padding, so the map has the input's size and border windows count (the
    original repo's definition). Variances are population variances."""
    if img1.shape != img2.shape or img1.dim() != 4:
        raise ValueError(f"ssim expects two (B, C, H, W) tensors of one shape, got "
                         f"{tuple(img1.shape)} and {tuple(img2.shape)}")
    img1, img2 = img1.float(), img2.float()
    rows = gaussian_band(img1.shape[2], window_size, sigma).to(img1)
    columns = gaussian_band(img1.shape[3], window_size, sigma).to(img1)

    def local_mean(x):
        return rows @ x @ columns.T

    mu1, mu2 = local_mean(img1), local_mean(img2)
    return _ssim_from_moments(mu1, mu2, local_mean(img1 * img1) - mu1 ** 2, local_mean(img2 * img2) - mu2 ** 2,
                              local_mean(img1 * img2) - mu1 * mu2, data_range, k1, k2)


def ssim(img1, img2, size_average=True):
    """SSIM of (B, C, H, W) images in [0, 1]: 11x11 Gaussian window (sigma 1.5), K1 0.01,
    K2 0.03, data range 1. Returns the mean over the batch of per-image scores, or the
    per-image scores (B,) when size_average is False."""
    per_image = ssim_map(img1, img2).flatten(1).mean(1)
    return per_image.mean() if size_average else per_image


def reconstruction_ssim(images, reconstructions):
    """Per-image SSIM (B,) of reconstructions against images, both in the models' [-1, 1]
    range (reconstructions are clamped to it, then both are mapped to [0, 1])."""
    return ssim((images.float() + 1) / 2, (reconstructions.float().clamp(-1, 1) + 1) / 2, size_average=False)


def pairwise_ssim(a, b, chunk_elements=2 ** 24):
    """SSIM of every image of a (Na, 1, H, W) against every image of b (Nb, 1, H, W), both in
    [-1, 1] (clamped): (Na, Nb), what reconstruction_ssim gives each pair, with each image's
    window statistics computed once."""
    a, b = ((x.float().clamp(-1, 1)[:, 0] + 1) / 2 for x in (a, b))
    rows, columns = gaussian_band(a.shape[1]).to(a), gaussian_band(a.shape[2]).to(a)

    def local_mean(x):
        return rows @ x @ columns.T

    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a, var_b = local_mean(a * a) - mu_a ** 2, local_mean(b * b) - mu_b ** 2
    step = max(1, chunk_elements // b.numel())
    blocks = []
    for i in range(0, len(a), step):
        mu_i, var_i = mu_a[i:i + step, None], var_a[i:i + step, None]
        covar = local_mean(a[i:i + step, None] * b[None]) - mu_i * mu_b[None]
        blocks.append(_ssim_from_moments(mu_i, mu_b[None], var_i, var_b[None], covar).flatten(2).mean(2))
    return torch.cat(blocks)


# ----------------------------------------------------------------------------- embeddings
def sinusoidal_embedding(positions, dim, max_period=10000.0):
    """Transformer / diffusion-timestep embedding: (N,) positions -> (N, dim) as [cos | sin]."""
    if dim % 2:
        raise ValueError(f"sinusoidal_embedding needs an even dim, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * freqs.to(positions.device)[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


# ----------------------------------------------------------------------------- user errors
class UserError(SystemExit):
    """An expected mistake of the user's (a missing file, a wrong setting), raised with one
    sentence that says what is wrong and which command or constant fixes it. Being a
    SystemExit, it prints just that sentence and exits with status 1 when nothing catches it:
    no traceback in front of the sentence that matters."""


# ----------------------------------------------------------------------------- runtime
def seed_everything(seed):
    """Seed Python, numpy and torch (all devices) so a CPU run repeats exactly. Under torchrun each
    process from seed + its rank: one seed would give every process the same random latents, noise
    and timesteps (their models start alike all the same: DDP copies the main one's)."""
    seed += world_size_and_rank()[1]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_single_process():
    """Called first by a script that works in one process: stop when torchrun started it in
    several, each of which would do all the work and write the same files (pre_train.py,
    train_viT.py and stable_diffusion.py share theirs across processes: setup_distributed)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not torch.distributed.is_initialized():
        raise UserError(f"{os.path.basename(sys.argv[0])} runs in one process, and torchrun started {world_size}: "
                        f"run it with python (torchrun is for pre_train.py, train_viT.py and stable_diffusion.py)")


def get_device(gpu_index=None):
    """CUDA (GPU `gpu_index`) when present, else CPU: nothing in the project needs a GPU. On CUDA,
    cuDNN times its convolution algorithms on each new input shape and keeps the fastest
    (training shapes repeat)."""
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda", gpu_index)
    return torch.device("cpu")


def cpu_has_bf16():
    """Whether this CPU computes bf16 natively (AVX-512-BF16 or AMX), where bf16 autocast speeds
    training up; elsewhere (AVX2) PyTorch emulates it, many times slower."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def autocast_dtype(device, use_bf16, bf16_on_cuda=True):
    """The dtype a script's training steps autocast to on `device` (None: full precision).
    use_bf16 (a script's USE_BF16, checked on every device): on the CPU, None = bf16 where the CPU
    has bf16 instructions, True / False to force. On CUDA: bf16 where the GPU has it, or fp32
    where `bf16_on_cuda` is False (a script whose measured steps were no faster in bf16)."""
    if use_bf16 not in (None, True, False):
        raise UserError(f"USE_BF16 must be None (where the CPU has bf16 instructions), True or False, got {use_bf16!r}")
    if device.type == "cuda":
        return torch.bfloat16 if bf16_on_cuda and torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if (cpu_has_bf16() if use_bf16 is None else use_bf16) else None


def autocast(device, dtype):
    """Mixed precision on `device` in `dtype` (torch.bfloat16); dtype None: full precision."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def synchronize(device):
    """Wait for a GPU's queued kernels (timing asynchronous CUDA work); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def grey_levels(images):
    """Images in [-1, 1] (any shape) as uint8 grey levels 0..255, each rounded to the nearest
    level (x.5 up). Every picture, GIF frame and written volume goes through here, so a picture
    shows exactly the values a written volume holds."""
    return images.detach().float().cpu().add(1).div(2).clamp(0, 1).mul(255).add(0.5).to(torch.uint8)


def image_grid(images, nrow=8):
    """(B, 1, H, W) images in [-1, 1] as one uint8 grid (H', W') of `nrow` columns, 2 px apart."""
    from torchvision.utils import make_grid
    return make_grid(grey_levels(images), nrow=nrow, padding=2)[0].numpy()


def save_image_grid(images, path, nrow=8):
    """Save (B, 1, H, W) images in [-1, 1] as one greyscale PNG grid of `nrow` columns."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image_grid(images, nrow)).save(path)


def world_size_and_rank():
    """(number of processes, this process's rank): (1, 0) unless run under torchrun."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def make_loader(data, batch_size, shuffle, seed=0, drop_last=False, **loader_kwargs):
    """A DataLoader over `data`. Shuffling goes through a DistributedSampler seeded with `seed`:
    call loader.sampler.set_epoch(epoch) each epoch for a new order that a resumed run repeats
    exactly; under torchrun each process gets its own share. A training loader (drop_last) that
    would yield no batch at all is a UserError naming BATCH_SIZE."""
    sampler = None
    world_size, rank = world_size_and_rank()
    if shuffle:
        sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    loader_kwargs.setdefault("pin_memory", torch.cuda.is_available())   # faster, asynchronous copies to a GPU
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **loader_kwargs)
    if drop_last and len(loader) == 0:
        raise UserError(f"BATCH_SIZE {batch_size} (per process) leaves no full batch: {len(data)} training items "
                        f"for {world_size} process(es); lower BATCH_SIZE")
    return loader


def setup_distributed():
    """Join the process group when launched by torchrun (nccl on GPU, gloo on CPU) and return
    this process's device; a plain `python script.py` run just gets get_device()."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return get_device()
    # DDP compares each gradient's strides with its bucket's, size-1 dims included, so the 1x1 conv
    # that reads the attention's channels-last output (AttentionBlock.proj) warned on every run,
    # though PyTorch's layout contract ignores size-1 dims and the reducer copies the gradient
    # into its bucket either way
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:   # CUDA would fail later with "invalid device ordinal"
            raise UserError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1)} processes on this "
                            f"machine but it has {gpus} GPU(s): run one process per GPU (--nproc_per_node={gpus}), "
                            f"or CPU processes with gloo (CUDA_VISIBLE_DEVICES= torchrun ...)")
        torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group("nccl")
        return get_device(local_rank)
    torch.distributed.init_process_group("gloo")
    return torch.device("cpu")


@contextlib.contextmanager
def main_process_alone(is_main):
    """The testing and sampling after torchrun's training are the main process's alone: every
    process enters this block right after the last epoch's barrier and leaves the process group;
    the others end there, the main one runs the block and ends when it does, with status 0, or 1
    after printing the error (a UserError's sentence, or the traceback) that stopped it. All end
    with os._exit, skipping Python's shutdown: with a DistributedDataParallel wrapper made, the
    gloo group's worker threads outlive destroy_process_group, and one still letting go of a
    collective's tensors needs the GIL, which a shutting-down interpreter answers by ending the
    thread: SIGABRT, "terminate called without an active exception" (pytorch/pytorch#190489; the
    backtrace caught in gdb here). It aborted 4 of 100 two-process runs that ended through the
    shutdown. A run in one process has no group to leave, and runs the block as any other."""
    if not torch.distributed.is_initialized():
        yield
        return
    torch.distributed.destroy_process_group()
    if not is_main:
        _exit_now(0)
    try:
        yield
    except SystemExit as stop:      # a UserError: its sentence and status, as Python gives them
        status = stop.code
        if status is not None and not isinstance(status, int):
            print(status, file=sys.stderr)
            status = 1
        _exit_now(status or 0)
    except (Exception, KeyboardInterrupt):
        traceback.print_exc()
        _exit_now(1)
    _exit_now(0)


def _exit_now(status):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def cosine_learning_rate(step, total_steps, peak, min_ratio):
    """Cosine decay from `peak` to `peak * min_ratio` over the run (nanoGPT style, no warm-up)."""
    progress = min(step / max(total_steps - 1, 1), 1.0)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def check_finite(values, step, last_path, advice):
    """Stop on a NaN or infinite logged value, naming the step and the term; called before the
    epoch's checkpoint is written, so `last_path` keeps the last good epoch."""
    for name, value in values.items():
        if not math.isfinite(value):
            raise FloatingPointError(f"step {step}: {name} is {value}; stopped before saving, so "
                                     f"{last_path} still holds the last good epoch. {advice}")


class StepValues:
    """Each training step's logged values (loss tensors and plain numbers), checked for NaN
    (check_finite) and written to `log` (None: not the main process). Under torchrun the tensors
    are averaged over the processes first, so the log holds the loss DDP optimises (the mean of
    every process's batch) and a NaN in any process stops them all. On a GPU the tensors are
    fetched in one transfer every `CUDA_FETCH_EVERY` steps, as a .item() per value and step would
    make the CPU wait for the GPU each step; on the CPU every step, at no cost. Call flush() at
    the end of each epoch, before its checkpoint is written."""
    CUDA_FETCH_EVERY = 25

    def __init__(self, log, device, last_path, advice):
        self.log, self.last_path, self.advice = log, last_path, advice
        self.every = self.CUDA_FETCH_EVERY if torch.device(device).type == "cuda" else 1
        self.pending, self.latest = [], {}

    def add(self, step, values):
        """Queue one step's {name: tensor or number}; returns the latest fetched values. The step's
        tensors are stacked at once: a CUDA graph's outputs (CudaGraphStep) are overwritten by its
        next replay."""
        names = [name for name, value in values.items() if torch.is_tensor(value)]
        stacked = torch.stack([values[name].detach().float().reshape(()) for name in names]) if names else None
        self.pending.append((step, {name: None if name in names else value for name, value in values.items()},
                             names, stacked))
        if len(self.pending) >= self.every:
            self.flush()
        return self.latest

    def flush(self):
        stacked = [entry[3] for entry in self.pending if entry[3] is not None]
        fetched = torch.cat(stacked) if stacked else torch.zeros(0)
        world_size, _ = world_size_and_rank()
        if world_size > 1 and stacked:     # every process flushes at the same steps (gloo has no AVG)
            torch.distributed.all_reduce(fetched)
            fetched /= world_size
        fetched = iter(fetched.tolist())
        for step, values, names, _ in self.pending:
            values.update((name, next(fetched)) for name in names)
            check_finite(values, step, self.last_path, self.advice)
            if self.log is not None:
                self.log.write(step, values)
            self.latest = values
        self.pending = []


@contextlib.contextmanager
def frozen(module):
    """`module`'s parameters get no gradients from what runs inside: the discriminator in the
    generator's step, whose weight gradients there would only be thrown away (the generator's
    backward still passes through it)."""
    module.requires_grad_(False)
    try:
        yield
    finally:
        module.requires_grad_(True)


def set_capturable(optimizer, capturable):
    """Ready an Adam (after any load_state_dict, which brings back the saved groups' settings)
    for updates that a CUDA graph replays, or for plain ones: capturable, with its learning rate
    in a GPU tensor that set_learning_rate fills in place (a float would be baked into the graph),
    or a float. Reads the learning rate back once."""
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        group["capturable"] = capturable
        group["lr"] = torch.tensor(lr, device=group["params"][0].device) if capturable else lr


def set_learning_rate(optimizer, lr):
    """Every parameter group's learning rate: in place where it is a tensor (set_capturable)."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def training_step_runner(step, optimizers, graphed):
    """`step` as a training loop calls it: with `graphed`, replayed as a CUDA graph
    (CudaGraphStep) and its `optimizers` readied for that (set_capturable; call after any resume,
    whose load_state_dict brings back the saved settings); else `step` itself, its optimizers
    plain."""
    for optimizer in optimizers:
        set_capturable(optimizer, graphed)
    return CudaGraphStep(step) if graphed else step


def train_epoch(loader, epoch, epochs, run_step, optimizer, step, step_values, device, learning_rate, min_lr_ratio,
                show_progress=True, inputs=lambda *batch: batch):
    """One epoch of a one-optimizer training loop (the critic's, the prior's, the diffusion's):
    per batch, the optimizer's learning rate from the cosine schedule at `step`, then
    run_step(*inputs(*batch)) with the inputs on `device`, its values into `step_values` and onto
    the progress bar. Returns (the step after the epoch, the epoch's seconds)."""
    loader.sampler.set_epoch(epoch)
    start = time.time()
    progress = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not show_progress, leave=False)
    for batch in progress:
        set_learning_rate(optimizer, cosine_learning_rate(step, epochs * len(loader), learning_rate, min_lr_ratio))
        values = step_values.add(step, run_step(*(tensor.to(device, non_blocking=True) for tensor in inputs(*batch))))
        if values:
            progress.set_postfix(loss=f"{values['train_loss']:.4f}")
        step += 1
    step_values.flush()
    return step, time.time() - start


class CudaGraphStep:
    """A training step that a CUDA graph replays: forward, backward and optimizer updates launched
    as one graph instead of thousands of kernels issued one by one from Python, which kept the GPU
    waiting on the host (PyTorch's whole-network capture). `step(*tensors)` runs eagerly for the
    first `warmup` calls, on a side stream as capture asks (optimizer states, cuDNN's algorithm
    choices and the codebook's data init settle there); the next call captures it, and each later
    call copies its tensors into the graph's own and replays. `step` must keep to: the same shapes
    every call; nothing read back to the host; optimizers readied by set_capturable; whatever
    changes between calls passed in as a tensor or held in a tensor updated in place. Its outputs
    belong to the graph and the next call overwrites them: queue what reads them before that.
    CUDA only: a CPU run calls its step directly."""

    def __init__(self, step, warmup=3):
        self.step, self.warmup, self.calls = step, warmup, 0
        self.side_stream = self.graph = self.inputs = self.outputs = None

    def __call__(self, *tensors):
        self.calls += 1
        if self.calls <= self.warmup:     # one side stream for all: autograd keeps each parameter's stream
            self.side_stream = self.side_stream or torch.cuda.Stream()
            self.side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side_stream):
                outputs = self.step(*tensors)
            torch.cuda.current_stream().wait_stream(self.side_stream)
            return outputs
        if self.graph is None:
            self.inputs = [tensor.clone() for tensor in tensors]
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the loader's pinning thread may touch CUDA meanwhile
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.outputs = self.step(*self.inputs)
        else:
            for static, tensor in zip(self.inputs, tensors):
                if static.shape != tensor.shape:
                    raise ValueError(f"a CUDA graph replays one shape: captured {tuple(static.shape)}, "
                                     f"given {tuple(tensor.shape)}")
                static.copy_(tensor, non_blocking=True)
        self.graph.replay()      # capturing ran nothing: this call's step runs here too
        return self.outputs


def write_summary(summary, log_dir, run_name):
    """A training run's closing figures: all of them to <log_dir>/<run_name>_summary.json, and
    all but the config printed."""
    with open(os.path.join(log_dir, f"{run_name}_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(obj, path, also=None):
    """Write `obj` with torch.save to a temporary file beside `path`, then rename it over
    `path`: a run killed mid-save leaves the previous checkpoint intact. With `also` (the best
    checkpoint of an epoch that improved), the same file is hard-linked there first, so its
    bytes are written once: a GPU epoch of the 256x256 first stage writes 234 MB, not 468."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if also:
            _place_copy(tmp_path, also)
        os.replace(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise


def _place_copy(source, path):
    """Put `source`'s file at `path` atomically: a hard link where the file system allows
    one, else a copy."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    link_path = os.path.join(directory, f".tmp-link-{os.getpid()}-{os.path.basename(path)}")
    if os.path.lexists(link_path):
        os.unlink(link_path)
    try:
        os.link(source, link_path)
    except OSError:     # another file system, or none with hard links
        shutil.copyfile(source, link_path)
    os.replace(link_path, path)


def load_checkpoint(path, config=None, shape_keys=(), map_location="cpu"):
    """Load a checkpoint dict saved by save_checkpoint (weights_only=True: tensors and plain
    Python values only). With `config`, refuse a checkpoint whose stored config differs
    from it in any of `shape_keys` (the constants that set tensor shapes). A missing, unreadable
    or mismatched checkpoint is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"checkpoint {path} cannot be read ({first_line}); it is corrupt or "
                        f"not a checkpoint of this project") from error
    if not isinstance(checkpoint, dict):
        raise UserError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a checkpoint of this project "
                        f"(a dict of weights and config)")
    if config is not None:
        stored = checkpoint.get("config", {})
        differing = [f"{key}: checkpoint {stored.get(key)!r}, script {config.get(key)!r}"
                     for key in shape_keys if stored.get(key) != config.get(key)]
        if differing:
            raise UserError(f"checkpoint {path} was made with another config, so its tensor "
                             f"shapes do not fit this script's model:\n  " + "\n  ".join(differing)
                            + "\nUse the same settings, or point the script elsewhere.")
    return checkpoint


def load_weights(target, state, path):
    """target.load_state_dict(state), where a mismatch (a checkpoint from an older version of a
    model, whose layers have changed since) is a UserError naming the file."""
    try:
        target.load_state_dict(state)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[0]
        raise UserError(f"checkpoint {path} does not fit this code's {type(target).__name__} ({first_line}); it was "
                        f"made by another version of the model: train it again, or point the script elsewhere") \
            from error


def rng_states():
    """The random generators' states for a checkpoint (CPU, and each GPU's where there are GPUs:
    random latents, dropout and sampling on a GPU draw from its generator), restored by resume().
    Under torchrun every process's too, gathered: only the main one validates and draws pictures,
    so their generators part. A collective then: every process calls it, after the main one's
    validation."""
    states = {"rng_state": torch.get_rng_state(),
              "cuda_rng_state": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    world_size, _ = world_size_and_rank()
    if world_size > 1:
        every_process = [None] * world_size
        torch.distributed.all_gather_object(every_process, states)
        states["process_rng_states"] = every_process
    return states


def resume(last_path, config, shape_keys, targets, verbose=True):
    """Continue a run: when `last_path` exists, load it (refusing another config), restore each
    of `targets` ({checkpoint key: module or optimizer}) and the random generators, and return
    the checkpoint; None when there is nothing to resume."""
    if not os.path.exists(last_path):
        return None
    checkpoint = load_checkpoint(last_path, config, shape_keys)
    for key, target in targets.items():
        load_weights(target, checkpoint[key], last_path)
    world_size, rank = world_size_and_rank()
    every_process = checkpoint.get("process_rng_states")
    # each process its own generators where as many saved them; else the main one's for all
    states = every_process[rank] if every_process is not None and len(every_process) == world_size else checkpoint
    torch.set_rng_state(states["rng_state"])
    if states.get("cuda_rng_state") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda_rng_state"])
    if verbose:
        print(f"resuming {last_path}: epoch {checkpoint['epoch']}, step {checkpoint['step']}")
    return checkpoint


# ----------------------------------------------------------------------------- config overrides
def config_block(path):
    """A script's settings as {NAME: [comment, ...]}: the constants assigned in its config block,
    from its `# ---- config` line to the first blank line, each with the comment on its line and
    the indented comment lines that continue it. None where the script has no such block."""
    block, name = None, None
    with open(path) as f:
        for token in tokenize.generate_tokens(f.readline):
            if block is None:
                if token.type == tokenize.COMMENT and token.start[1] == 0 and re.match(r"# -+ config", token.string):
                    block = {}
            elif token.type == tokenize.NL and not token.line.strip():
                break                                   # the blank line that ends the block
            elif token.type == tokenize.COMMENT and name and token.start[1] > 0:
                block[name].append(token.string)
            elif token.start[1] == 0 and token.type not in (tokenize.NL, tokenize.NEWLINE):
                # anything at column 0, a section comment included, ends the last constant's comments
                name = token.string if token.type == tokenize.NAME and token.string.isupper() else None
                if name:
                    block[name] = []
    return block


def script_config_block(namespace):
    """config_block of the script whose globals `namespace` holds; None for a plain dict."""
    return config_block(namespace["__file__"]) if namespace.get("__file__") else None


def config_names(namespace):
    """The user-editable constants of a script: its upper-case globals of plain types, only those
    of its config block where it has one (so that NUM_Z, SHAPE_KEYS or an imported constant
    cannot be overridden)."""
    block = script_config_block(namespace)
    return [name for name, value in namespace.items()
            if name.isupper() and not name.startswith("_") and (block is None or name in block)
            and isinstance(value, (int, float, bool, str, tuple, list, type(None)))]


_TYPE_WORDS = {bool: "True or False", int: "an integer", float: "a number", str: "a string",
               tuple: "a tuple", list: "a list", type(None): "None"}


def _example(name, default, source):
    """How to write the default of `name` where the bad value came from, as an example."""
    if not source.startswith("argument"):
        return f"{name} = {default!r}"
    text = default if isinstance(default, str) else repr(default)
    return f"--{name}={shlex.quote(text)}"


def _converted(value, types):
    """`value`, an int made a float and a list a tuple where `types` want those; else as it is."""
    if float in types and type(value) is int:
        return float(value)
    if tuple in types and isinstance(value, list):
        return tuple(value)
    return value


def _checked_value(name, default, value, source, types):
    """`value` converted to one of `types` (the default's type first), or a UserError naming the
    constant, the type expected and an example."""
    value = _converted(value, types)
    # bool is a subclass of int: compare exact types so True never passes for an int
    if type(value) not in types:
        raise UserError(f"{source}: {name} must be {' or '.join(_TYPE_WORDS[t] for t in types)}, "
                        f"e.g. {_example(name, default, source)} (its default); got {value!r}")
    return value


def _parse_literal(text, types):
    """A command-line value: a Python literal, or the raw text ("--MODE=VAE"; always where a
    string is allowed and the literal's type is not, so "--RUN_NAME=2" is "2" and "--DATA_DIR=2024"
    a folder). Text that other constants cannot parse is returned as is, for _checked_value to
    refuse with the type expected."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text
    return text if str in types and type(_converted(value, types)) not in types else value


def check_positive_ints(config, names):
    """Stop with a UserError naming the first of `names` whose value is not a positive integer."""
    for name in names:
        value = config[name]
        if type(value) is not int or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")


def checked_patch_size(config, grid_shape, grid_name):
    """config["PATCH_SIZE"], after checking that it is a positive integer that tiles the first
    stage's grid_shape (h, w), which the message calls `grid_name`."""
    check_positive_ints(config, ("PATCH_SIZE",))
    patch = config["PATCH_SIZE"]
    if grid_shape[0] % patch or grid_shape[1] % patch:
        raise UserError(f"PATCH_SIZE={patch} must divide the first stage's {grid_name}, "
                        f"{grid_shape[0]}x{grid_shape[1]}")
    return patch


def check_guidance(config):
    """A second stage's classifier-free guidance constants: Z_DROP a share in [0, 1), GUIDANCE_SCALES
    scales >= 0, and a scale other than 1 only with an unconditional branch to guide from (slices
    told no z, and for a script with Z_CONDITIONING, z read at all)."""
    z_drop, scales = config["Z_DROP"], config["GUIDANCE_SCALES"]
    if not 0 <= z_drop < 1:
        raise UserError(f"Z_DROP must be in [0, 1) (the share of training items told no z), got {z_drop}")
    if not scales or min(scales) < 0:
        raise UserError(f"GUIDANCE_SCALES must hold scales >= 0 (1 = no guidance), got {scales}")
    conditioned = config.get("Z_CONDITIONING", True)
    if set(scales) != {1.0} and not (conditioned and z_drop > 0):
        needed = ("Z_CONDITIONING=True and " if "Z_CONDITIONING" in config else "") + "Z_DROP > 0"
        raise UserError(f"GUIDANCE_SCALES {scales} need an unconditional branch: {needed} (e.g. 0.1), "
                        f"or GUIDANCE_SCALES=(1.0,)")


def checked_channel_mults(config):
    """config["CHANNEL_MULTS"], or a UserError unless it is a non-empty tuple of positive integers."""
    mults = config["CHANNEL_MULTS"]
    if not mults or not all(type(mult) is int and mult > 0 for mult in mults):
        raise UserError(f"CHANNEL_MULTS must be a non-empty tuple of positive integers, one per level, "
                        f"e.g. (1, 2); got {mults!r}")
    return mults


def config_help(namespace, names):
    """What `--help` prints: how to call the script, its docstring, and every constant of `names`
    (config_names) as `NAME = value  # its comment`, the values as the arguments before --help
    left them."""
    comments = script_config_block(namespace) or {}
    script = os.path.basename(namespace.get("__file__") or sys.argv[0])
    lines = [f"usage: python {script} [config/preset.py ...] [--NAME=value ...]", "",
             (namespace.get("__doc__") or "").strip(), "",
             "constants (--NAME=value, or NAME = value lines in a config file; arguments apply left to right):"]
    for name in names:
        assignment = f"{name} = {namespace[name]!r}"
        first, *more = comments.get(name) or [""]
        lines.append(f"{assignment:<40} {first}".rstrip())
        lines += [f"{'':<40} {comment}" for comment in more]
    return "\n".join(lines)


def apply_overrides(namespace, argv=None, other_types=None):
    """Override a script's upper-case constants in place, nanoGPT style. Arguments are read
    left to right: `path/to/preset.py` executes a small config file of plain assignments,
    `--NAME=value` sets one constant (a Python literal; bare text for strings). A value must
    have the script's default's type (a None default: None or text), or the type `other_types`
    ({name: type}) allows besides it (an int or a tuple of per-level counts, bool for a None
    default that means "decide for me"), even
    after an earlier argument gave the constant the other type. Unknown names, values of the
    wrong type and unreadable config files stop with a UserError. `--help` (or `-h`) prints
    config_help and exits.
    Returns the final {name: value} config."""
    argv = sys.argv[1:] if argv is None else argv
    other_types = other_types or {}
    names = config_names(namespace)
    defaults = {name: namespace[name] for name in names}    # types come from these, whatever set them since
    for arg in argv:
        if arg in ("--help", "-h"):
            try:
                print(config_help(namespace, names), flush=True)
            except BrokenPipeError:
                # the reader stopped early (`--help | head`): end quietly, as any command-line tool; the
                # unwritten text stays buffered, and Python's flush at exit would report the pipe again
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(0)
        if arg.startswith("--"):
            if "=" not in arg:
                raise UserError(f"argument {arg!r}: expected --NAME=value")
            name, text = arg[2:].split("=", 1)
            updates, source = {name: text}, f"argument {arg!r}"
        else:
            if not os.path.isfile(arg):
                raise UserError(f"config file {arg} does not exist (expected a .py file of "
                                f"NAME = value lines, or --NAME=value)")
            assignments = {}
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, "exec"), {}, assignments)
            except Exception as error:
                raise UserError(f"config file {arg} cannot be run ({type(error).__name__}: {error}); "
                                f"expected plain NAME = value lines") from error
            updates = {k: v for k, v in assignments.items() if not k.startswith("_")}
            source = f"config file {arg}"
        for name, value in updates.items():
            if name not in names:
                raise UserError(f"{source}: unknown constant {name!r}; this script has: "
                                + ", ".join(sorted(names)))
            default = defaults[name]
            # a None default (a folder, or "decide for me") takes None or text, and True / False where
            # other_types says bool (USE_BF16), so that --DATA_DIR=True is a folder named True
            types = ((type(None), str) if default is None else (type(default),)) \
                + ((other_types[name],) if name in other_types else ())
            if isinstance(value, str) and source.startswith("argument"):
                value = _parse_literal(value, types)
            namespace[name] = _checked_value(name, default, value, source, types)
    return {name: namespace[name] for name in names}
