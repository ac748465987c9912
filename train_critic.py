"""Train the brain critic (model_critic.py) on the real training slices, never on generated ones.

    python train_critic.py                                   # the demo brains at 64x64, ~1 min on 2 cores
    python train_critic.py --DATA_DIR=/data/oasis --IMG_SIZE=256
    python train_critic.py --DATA_DIR=my_slices --SEGMENTATION=False   # data without seg folders: z only

The critic learns each slice's z-index (cross-entropy over the 32 positions) and, where the data
has keras_png_slices_seg_* folders, its tissue labels (pixel-wise cross-entropy). One critic per
data set and image size: model_ckpt/critic_<data folder>_<size>px.pt, the weights at the end of a
fixed schedule (no epoch is picked: the z loss bottoms out early while the tissue labels keep
improving); the validate split is reported each epoch. Re-running resumes, or does nothing when the
run is complete. At the end the test split is scored once (z accuracy, Dice per tissue) into
log/<run>_summary.json.
predict.py reads the critic to compute the realism metrics (realism.py).
"""
import os

import torch
import torch.nn.functional as F

import dataset
import util
from logger import TrainingLog
import model_critic

# ----------------------------------------------------------------------------- config (CPU preset)
DATA_DIR = None              # OASIS-layout folder; None = the built-in demo brains
IMG_SIZE = 64                # the size the first stage works at: one critic per size
CHANNELS = (8, 16, 32, 32)   # per level; their sum is the feature size of the Frechet distance
SEGMENTATION = True          # learn tissue labels too (needs keras_png_slices_seg_* folders)
Z_TARGET_WIDTH = 1.0         # z is learned against a Gaussian of this width (in slices) around the true z
EPOCHS = 8
BATCH_SIZE = 16
LR = 3e-3
MIN_LR_RATIO = 0.1           # cosine decay to LR * MIN_LR_RATIO at the last step
CUDA_GRAPHS = False          # on a GPU: replay each training step as one CUDA graph (util.CudaGraphStep), as
                             # pre_train.py does; off until it has been measured on a GPU
SEED = 0
CKPT_DIR = "model_ckpt"
LOG_DIR = "log"

SHAPE_KEYS = ("IMG_SIZE", "CHANNELS", "SEGMENTATION")
NUM_Z = dataset.SLICES_PER_BRAIN


def soft_z_targets(zs, num_z, width):
    """Each z-index as a distribution over the num_z positions, a Gaussian of `width` around it:
    neighbouring slices look alike, so a near miss should cost less than a far one."""
    distance = torch.arange(num_z, device=zs.device)[None] - zs[:, None]
    return torch.softmax(-distance.float() ** 2 / (2 * width ** 2), dim=1)


def critic_losses(out, segs, zs):
    """{"z_loss": cross-entropy of the z-index against soft targets (Z_TARGET_WIDTH), "seg_loss":
    pixel-wise cross-entropy of the tissue labels}."""
    losses = {"z_loss": F.cross_entropy(out["z_logits"], soft_z_targets(zs, NUM_Z, Z_TARGET_WIDTH))}
    if out["seg_logits"] is not None:
        losses["seg_loss"] = F.cross_entropy(out["seg_logits"], segs[:, 0])
    return losses


@torch.no_grad()
def evaluate(critic, loader, device):
    """Mean losses, z accuracy (exact and within +-2) and Dice per tissue over a loader."""
    critic.eval()
    totals, count = {}, 0
    overlap, predicted_area, true_area = (torch.zeros(model_critic.NUM_TISSUES, device=device) for _ in range(3))
    for images, segs, _, zs in loader:
        images, zs = images.to(device), zs.to(device)
        segs = None if segs is None else segs.to(device)
        out = critic(images)
        predicted_z = out["z_logits"].argmax(1)
        values = {name: loss.item() for name, loss in critic_losses(out, segs, zs).items()}
        values.update(z_accuracy=(predicted_z == zs).float().mean().item(),
                      z_within_2=((predicted_z - zs).abs() <= 2).float().mean().item())
        for name, value in values.items():
            totals[name] = totals.get(name, 0.0) + value * len(images)
        count += len(images)
        if out["seg_logits"] is not None:
            predicted = F.one_hot(out["seg_logits"].argmax(1), model_critic.NUM_TISSUES)
            truth = F.one_hot(segs[:, 0], model_critic.NUM_TISSUES)
            overlap += (predicted * truth).sum((0, 1, 2))
            predicted_area += predicted.sum((0, 1, 2))
            true_area += truth.sum((0, 1, 2))
    critic.train()
    results = {name: total / count for name, total in totals.items()}
    if critic.decoder is not None:
        dice = (2 * overlap / (predicted_area + true_area).clamp(min=1))[1:]
        results.update({f"dice_{name}": value.item() for name, value in zip(model_critic.TISSUE_NAMES, dice)})
    return results


if __name__ == "__main__":
    util.check_single_process()
    config = util.apply_overrides(globals())
    data_dir = dataset.resolve_data_dir(DATA_DIR)
    run_name = model_critic.critic_run_name(data_dir, IMG_SIZE)
    device = util.get_device()
    util.seed_everything(SEED)

    train_loader = dataset.get_dataloader("train", BATCH_SIZE, data_dir, IMG_SIZE, seed=SEED)
    validate_loader = dataset.get_dataloader("validate", 64, data_dir, IMG_SIZE)
    if SEGMENTATION and train_loader.dataset.segs is None:
        raise util.UserError(f"{data_dir} has no keras_png_slices_seg_* folders, which the critic's tissue head "
                             f"learns from; train a z-only critic with --SEGMENTATION=False (the tissue "
                             f"metrics are then skipped, the others still run)")
    model_args = dict(channels=tuple(CHANNELS), num_z_positions=NUM_Z, segmentation=SEGMENTATION)
    critic = model_critic.BrainCritic(**model_args).to(device)
    optimizer = torch.optim.Adam(critic.parameters(), lr=LR, fused=device.type == "cuda")

    path = model_critic.critic_path(CKPT_DIR, data_dir, IMG_SIZE)
    start_epoch, step, train_seconds = 0, 0, 0.0
    checkpoint = util.resume(path, config, SHAPE_KEYS, {"model": critic, "optimizer": optimizer})
    if checkpoint:
        model_critic.refuse_other_data(checkpoint, path, data_dir, IMG_SIZE)   # resume only the same data's critic
        start_epoch, step, train_seconds = checkpoint["epoch"], checkpoint["step"], checkpoint["train_seconds"]
    log = TrainingLog(os.path.join(LOG_DIR, f"{run_name}.log"), resume_step=step if start_epoch else None)
    step_values = util.StepValues(log, device, path, "Try a lower LR.")
    print(f"critic {sum(p.numel() for p in critic.parameters()) / 1e6:.2f}M params, {len(train_loader.dataset)} "
          f"training slices of {data_dir} at {IMG_SIZE}px, device {device}")

    def training_step(images, zs, segs=None):
        losses = critic_losses(critic(images), segs, zs)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {name: value.detach() for name, value in (losses | {"train_loss": loss}).items()}

    run_step = util.training_step_runner(training_step, [optimizer], CUDA_GRAPHS and device.type == "cuda")
    for epoch in range(start_epoch, EPOCHS):
        step, epoch_seconds = util.train_epoch(   # a graph's inputs are tensors: no None for absent segs
            train_loader, epoch, EPOCHS, run_step, optimizer, step, step_values, device, LR, MIN_LR_RATIO,
            inputs=lambda images, segs, _, zs: (images, zs) if segs is None else (images, zs, segs))
        train_seconds += epoch_seconds

        validation = evaluate(critic, validate_loader, device)
        val_loss = validation["z_loss"] + validation.get("seg_loss", 0.0)
        log.write(step - 1, {"val_loss": val_loss, "val_z_within_2": validation["z_within_2"]}
                  | {f"val_{name}": value for name, value in validation.items() if name.startswith("dice")})
        checkpoint = {"config": config, "model_args": model_args, "model": critic.state_dict(),
                      "optimizer": optimizer.state_dict(), "data_dir": os.path.abspath(data_dir),
                      "data_fingerprint": dataset.data_fingerprint(data_dir), "epoch": epoch + 1, "step": step,
                      "train_seconds": train_seconds, **util.rng_states()}
        util.save_checkpoint(checkpoint, path)
        dice = "".join(f", Dice {name} {validation[f'dice_{name}']:.3f}" for name in model_critic.TISSUE_NAMES
                       if f"dice_{name}" in validation)
        images_per_second = len(train_loader) * BATCH_SIZE / epoch_seconds
        print(f"epoch {epoch + 1}/{EPOCHS} step {step}: val loss {val_loss:.4f}, z within +-2 "
              f"{validation['z_within_2']:.1%}{dice}, {images_per_second:.0f} img/s")

    test = evaluate(critic, dataset.get_dataloader("test", 64, data_dir, IMG_SIZE), device)
    summary = {"run": run_name, "data_dir": os.path.abspath(data_dir), "epochs": EPOCHS}
    summary.update({f"test_{name}": value for name, value in test.items()})
    summary.update(train_seconds=train_seconds, parameters=sum(p.numel() for p in critic.parameters()),
                   device=str(device), config=config)
    util.write_summary(summary, LOG_DIR, run_name)
