"""Realism metrics: do a source's brain volumes look like the real test brains?

A source is a set of volumes, (V, 32, 1, H, W) images in [-1, 1] with slice z = 0..31: real
brains, degraded copies of them, reconstructions, or a generator's samples. `describe` measures
each slice once (critic features, predicted z, tissue fractions, high-frequency energy, SSIM to
the nearest training and test slices, SSIM between volumes and between adjacent slices);
`score` turns those into one figure per metric against the real test brains, for any subset of
the volumes (so leaving one volume out at a time gives each figure a spread):

- frechet_distance: between the brain critic's features of the source's slices and of the test
  slices (FID with the critic for Inception), divided by the test features' total variance (the
  trace of their covariance) so that it reads the same whatever the critic's feature scale.
  Sources hold whole volumes, so every z counts the same on both sides; left out when either
  side has fewer slices than feature dimensions. The critic learns z and tissue, which additive
  noise does not change, so its features are nearly blind to noise: sharpness is the noise gauge.
- tissue_wasserstein: the critic segments each slice; per tissue (CSF, GM, WM) the 1-D
  Wasserstein distance between the source's and the test slices' tissue areas (in percent of
  the slice), within bands of 8 slices, averaged (after WASABI, Jafrasteh et al. 2025).
- sharpness: mean squared Laplacian inside the (eroded) brain, relative to the test slices'
  (after RealDeal, Zhu et al. 2025): 1 = real, blur < 1, noise > 1.
- detail_kurtosis: how that fine detail is spread, whatever its amount: the kurtosis of the
  Laplacian inside the brain, per slice, averaged. Real detail is sparse, strong at edges and
  sulci and faint elsewhere (about 4.6 on the demo brains); speckle is Gaussian (3). Noise over
  a blurred brain can match real's sharpness; it cannot match this.
- diversity_ssim: mean SSIM between different volumes at the same z (mode collapse: higher).
- z_faithfulness: share of slices whose critic-predicted z is within +-2 of the z asked for.
- memorisation: share of slices closer (SSIM) to their nearest training slice than any real test
  slice of that z is to its own. A held-out real brain beats the most training-like of n test
  brains by chance 1 / (n + 1) of the time, so only the share above that counts as a distance.
- adjacent_ssim, identity_correlation: volume coherence. SSIM between neighbouring slices of a
  volume, and how far a slice's critic features depart from the typical slice at its z in the
  same direction as its neighbour's do: a volume whose slices are one brain keeps its identity
  across z (real: about 0.6), a volume of unrelated slices does not (0).
- nearest_test_ssim: mean SSIM of each slice to its nearest test slice at that z. It favours
  blur (a smooth slice is close to every real one), so it is kept only as a secondary figure.

`distance_to_real` turns each figure into a distance from the real test brains' own (0 = real).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

import dataset
import util
from model_critic import TISSUE_NAMES, load_first_stage_critic

Z_TOLERANCE = 2              # z-faithfulness: predicted z within +-2 counts as right
Z_BAND = 8                   # tissue fractions are compared within bands of 8 slices
BRAIN_THRESHOLD = 0.1        # sharpness, detail kurtosis: the brain is where intensity (in [0, 1]) exceeds this ...
MASK_EROSION = 2             # ... eroded by 2 px, so the brain's outline does not count as texture
BATCH = 256
METRICS = ("frechet_distance", "tissue_wasserstein", "sharpness", "detail_kurtosis", "diversity_ssim",
           "z_faithfulness", "memorisation", "adjacent_ssim", "identity_correlation", "nearest_test_ssim")
LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


# ----------------------------------------------------------------------------- image operations
def gaussian_blur(images, sigma):
    """Gaussian blur of (B, 1, H, W) images, reflecting at the border (the known-bad control)."""
    radius = math.ceil(3 * sigma)
    taps = util.gaussian_taps(sigma, radius).to(images)
    padded = F.pad(images, (radius,) * 4, mode="reflect")
    return F.conv2d(F.conv2d(padded, taps.view(1, 1, 1, -1)), taps.view(1, 1, -1, 1))


def laplacian(images):
    """The 3x3 Laplacian of (B, 1, H, W) images, replicating the border: their finest detail."""
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), LAPLACIAN.to(images).view(1, 1, 3, 3))


def laplacian_moments(images):
    """Per image (B,), of the Laplacian L inside the eroded brain mask, intensity in [0, 1]: (the
    high-frequency energy, the mean of L^2; the kurtosis of L, E[(L - mean)^4] / var^2 as
    scipy.stats.kurtosis(fisher=False), 0 where the brain is flat or missing)."""
    images = (images.float().clamp(-1, 1) + 1) / 2
    detail = laplacian(images)
    brain = (images > BRAIN_THRESHOLD).float()
    brain = -F.max_pool2d(-brain, 2 * MASK_EROSION + 1, stride=1, padding=MASK_EROSION)
    pixels = brain.flatten(1).sum(1).clamp(min=1)

    def brain_mean(values):
        return (values * brain).flatten(1).sum(1) / pixels

    centred = detail - brain_mean(detail)[:, None, None, None]
    variance = brain_mean(centred ** 2)
    return brain_mean(detail ** 2), brain_mean(centred ** 4) / (variance ** 2).clamp(min=1e-20)


# ----------------------------------------------------------------------------- per-slice description
@torch.no_grad()
def describe(volumes, critic, train_volumes=None, test_volumes=None):
    """Measure every slice of volumes (V, Z, 1, H, W) once. train_volumes / test_volumes give the
    nearest-slice SSIMs (memorisation and the secondary score); a source that is the test set
    itself passes neither. Returns numpy arrays: features (V, Z, F), predicted_z (V, Z),
    tissue_area (V, Z, 3) or None, energy and kurtosis (V, Z) (laplacian_moments), same_z_ssim
    (Z, V, V), adjacent_ssim (V, Z-1), and nearest_train_ssim / nearest_test_ssim (V, Z) when asked."""
    num_volumes, num_z = volumes.shape[:2]
    device = next(critic.parameters()).device
    slices = volumes.reshape(num_volumes * num_z, *volumes.shape[2:])
    features, predicted_z, tissue_area, energy, kurtosis = [], [], [], [], []
    for start in range(0, len(slices), BATCH):
        batch = slices[start:start + BATCH].to(device).float().clamp(-1, 1)
        out = critic(batch)
        features.append(out["features"].cpu())
        predicted_z.append(out["z_logits"].argmax(1).cpu())
        if out["seg_logits"] is not None:
            labels = out["seg_logits"].argmax(1)
            tissue_area.append(torch.stack([(labels == k).float().mean((1, 2)) for k in (1, 2, 3)], 1).cpu())
        moments = laplacian_moments(batch)
        energy.append(moments[0].cpu())
        kurtosis.append(moments[1].cpu())

    # float64: a figure averaged over slices then comes out the same whatever the slices' order
    def per_slice(parts):
        joined = torch.cat(parts)
        joined = joined.double() if joined.is_floating_point() else joined
        return joined.reshape(num_volumes, num_z, *joined.shape[1:]).numpy()

    # on the critic's device: left on the CPU, these searches took most of predict.py's time in `make gpu`
    def pairwise_ssim(a, b):
        return util.pairwise_ssim(a.to(device), b.to(device)).cpu()

    description = {"features": per_slice(features), "predicted_z": per_slice(predicted_z),
                   "tissue_area": per_slice(tissue_area) if tissue_area else None, "energy": per_slice(energy),
                   "kurtosis": per_slice(kurtosis),
                   "same_z_ssim": np.stack([pairwise_ssim(volumes[:, z], volumes[:, z]).double().numpy()
                                            for z in range(num_z)]),
                   "adjacent_ssim": np.stack([util.reconstruction_ssim(volume[:-1].to(device).clamp(-1, 1),
                                                                       volume[1:].to(device)).cpu().numpy()
                                              for volume in volumes])}
    for name, others in (("nearest_train_ssim", train_volumes), ("nearest_test_ssim", test_volumes)):
        if others is not None:
            description[name] = np.stack([pairwise_ssim(volumes[:, z], others[:, z]).max(1).values.numpy()
                                          for z in range(num_z)], 1)
    return description


# ----------------------------------------------------------------------------- figures
def frechet_distance(features_a, features_b):
    """Frechet distance between Gaussians fitted to two feature sets (N, F), as FID."""
    from scipy import linalg    # scipy where it is used: at the top it cost every script that imports realism 1.3 s
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def identity_correlation(features):
    """Volumes (V, Z, F) of critic features: centre each z on the source's mean at that z, and
    average the cosine similarity of each slice's remainder with its neighbour's. One brain
    across z carries its departures from the typical slice over to the next (real brains: about
    0.6); slices of unrelated brains give 0, blur raises it, noise lowers it."""
    residual = features - features.mean(0, keepdims=True)
    residual = residual / np.linalg.norm(residual, axis=-1, keepdims=True).clip(min=1e-12)
    return float((residual[:, :-1] * residual[:, 1:]).sum(-1).mean())


def score(description, reference, volumes=None):
    """The figures (see the module docstring) of a described source, against the described test
    brains `reference` (which holds a `memorisation_threshold` per z, see reference_description),
    over the volumes indexed by `volumes` (default: all)."""
    index = np.arange(len(description["energy"])) if volumes is None else np.asarray(volumes)
    # per volume: all but the pairwise SSIMs (indexed below) and a reference's threshold per z
    d = {name: value[index] for name, value in description.items()
         if name not in ("same_z_ssim", "memorisation_threshold") and value is not None}
    num_z = d["energy"].shape[1]
    flat_features = d["features"].reshape(-1, d["features"].shape[-1])
    reference_features = reference["features"].reshape(-1, flat_features.shape[1])
    figures = {"sharpness": float(d["energy"].mean() / reference["energy"].mean()),
               "detail_kurtosis": float(d["kurtosis"].mean()),
               "z_faithfulness": float((np.abs(d["predicted_z"] - np.arange(num_z)) <= Z_TOLERANCE).mean()),
               "adjacent_ssim": float(d["adjacent_ssim"].mean())}
    # the covariances must be full rank: more slices than feature dimensions on both sides
    if min(len(flat_features), len(reference_features)) > flat_features.shape[1]:
        figures["frechet_distance"] = (frechet_distance(flat_features, reference_features)
                                       / np.trace(np.cov(reference_features, rowvar=False)))
    if description["tissue_area"] is not None:
        from scipy import stats     # as in frechet_distance
        distances = [stats.wasserstein_distance(100 * d["tissue_area"][:, band:band + Z_BAND, tissue].ravel(),
                                                100 * reference["tissue_area"][:, band:band + Z_BAND, tissue].ravel())
                     for band in range(0, num_z, Z_BAND) for tissue in range(len(TISSUE_NAMES))]
        figures["tissue_wasserstein"] = float(np.mean(distances))
    if len(index) > 1:           # pairs of different volumes; a typical slice per z to depart from
        figures["identity_correlation"] = identity_correlation(d["features"])
        same_z = description["same_z_ssim"][:, index][:, :, index]
        figures["diversity_ssim"] = float(same_z[:, ~np.eye(len(index), dtype=bool)].mean())
    if "nearest_train_ssim" in d:
        figures["memorisation"] = float((d["nearest_train_ssim"] > reference["memorisation_threshold"]).mean())
    if "nearest_test_ssim" in d:
        figures["nearest_test_ssim"] = float(d["nearest_test_ssim"].mean())
    return figures


def reference_description(real_volumes, critic, train_volumes):
    """The real brains sources are scored against (test, or validate when choosing a setting):
    (their describe() plus each z's memorisation threshold, the highest SSIM any of their slices
    of that z has to its nearest training slice; their own figures, plus the share a held-out
    real brain is memorised by chance)."""
    reference = describe(real_volumes, critic, train_volumes=train_volumes)
    reference["memorisation_threshold"] = reference["nearest_train_ssim"].max(0)
    real = score(reference, reference)
    real["memorisation_by_chance"] = 1 / (len(real_volumes) + 1)
    return reference, real


def distance_to_real(figures, real):
    """Each figure as a distance from the real test brains' own figure `real` (0 = real, higher =
    further): the Frechet and Wasserstein distances as they are, |log| of the sharpness, detail
    kurtosis and diversity ratios, the share of slices off their z, the share memorised beyond
    what real brains reach by chance, and the coherence gaps."""
    distances = {"sharpness": abs(math.log(max(figures["sharpness"], 1e-12))),
                 "detail_kurtosis": abs(math.log(max(figures["detail_kurtosis"], 1e-12) / real["detail_kurtosis"])),
                 "z_faithfulness": 1 - figures["z_faithfulness"],
                 "adjacent_ssim": abs(figures["adjacent_ssim"] - real["adjacent_ssim"])}
    if "identity_correlation" in figures and "identity_correlation" in real:
        distances["identity_correlation"] = abs(figures["identity_correlation"] - real["identity_correlation"])
    for name in ("frechet_distance", "tissue_wasserstein"):
        if name in figures:
            distances[name] = figures[name]
    if "memorisation" in figures:
        distances["memorisation"] = max(0.0, figures["memorisation"] - real["memorisation_by_chance"])
    if "diversity_ssim" in figures and "diversity_ssim" in real:      # both need two volumes or more
        distances["diversity_ssim"] = abs(math.log(figures["diversity_ssim"] / real["diversity_ssim"]))
    return distances


# ----------------------------------------------------------------------------- a whole comparison
SHOWN = (("frechet_distance", "Frechet dist.", "{:.3f}"), ("tissue_wasserstein", "tissue W1 (pp)", "{:.2f}"),
         ("sharpness", "sharpness", "{:.2f}"), ("detail_kurtosis", "detail kurtosis", "{:.2f}"),
         ("diversity_ssim", "diversity SSIM", "{:.3f}"),
         ("z_faithfulness", "z within +-2", "{:.0%}"), ("memorisation", "memorised", "{:.0%}"),
         ("adjacent_ssim", "adjacent SSIM", "{:.3f}"), ("identity_correlation", "identity corr.", "{:.2f}"),
         ("nearest_test_ssim", "nearest-test SSIM*", "{:.3f}"))


def evaluate_sources(sources, critic, train_volumes, test_volumes):
    """Score each source {name: volumes (V, Z, 1, H, W)} against the real test volumes:
    {"real_test": the test brains' own figures, "sources": {name: {"volumes", "figures",
    "spread" (jackknife standard error over volumes: how much a figure moves with the draw of
    volumes, e.g. between seeds), "distance_to_real"}}}."""
    reference, real = reference_description(test_volumes, critic, train_volumes)
    results = {"real_test": real, "sources": {}}
    for name, volumes in sources.items():
        description = describe(volumes, critic, train_volumes, test_volumes)
        figures = score(description, reference)
        count = len(volumes)
        leave_one_out = [score(description, reference, np.delete(np.arange(count), i))
                         for i in range(count if count > 1 else 0)]
        spread = {}
        for metric in figures:
            values = np.array([r[metric] for r in leave_one_out if metric in r])
            if len(values) == count > 1:
                spread[metric] = float(np.sqrt((count - 1) / count * ((values - values.mean()) ** 2).sum()))
        results["sources"][name] = {"volumes": count, "figures": figures, "spread": spread,
                                    "distance_to_real": distance_to_real(figures, real)}
    return results


SELECTION_METRICS = ("frechet_distance", "tissue_wasserstein", "sharpness", "detail_kurtosis", "diversity_ssim",
                     "z_faithfulness", "identity_correlation")


def choose_setting(sample, settings, critic, validate_volumes, train_volumes, seed=0):
    """Pick a sampler's setting (temperature, guidance scale, ...) on the validate split, never on
    test: sample(setting) -> volumes (V, Z, 1, H, W); each setting's volumes are scored against
    the real validate brains, and the setting with the best mean rank over SELECTION_METRICS
    (distances to real: Frechet, tissue, |log sharpness|, |log detail kurtosis|, |log diversity|,
    share off z, identity correlation gap; diversity keeps a strong guidance from trading variety
    for fidelity, detail kurtosis keeps sharpness from being bought with speckle, the identity
    correlation keeps guidance and sampling noise from breaking a volume into unrelated slices)
    wins. Every setting samples from torch's generator seeded with `seed` (common random
    numbers): a few volumes per setting then compare the settings, not the luck of their draws.
    Returns (the best setting, [{"setting", "figures", "distance_to_real", "mean_rank"} per setting])."""
    reference, real = reference_description(validate_volumes, critic, train_volumes)
    rows = []
    for setting in settings:
        torch.manual_seed(seed)
        figures = score(describe(sample(setting), critic, train_volumes), reference)
        rows.append({"setting": setting, "figures": figures, "distance_to_real": distance_to_real(figures, real)})
    metrics = [m for m in SELECTION_METRICS if all(m in row["distance_to_real"] for row in rows)]
    if len(metrics) < len(SELECTION_METRICS):
        # a search that silently ranks on fewer figures picks settings on what it can see
        print(f"realism: ranking without {', '.join(m for m in SELECTION_METRICS if m not in metrics)}: the "
              f"Frechet distance needs more sampled slices than the critic's {critic.feature_dim} features, "
              "diversity and identity need 2 volumes; sample more volumes per setting (SWEEP_VOLUMES)")
    from scipy import stats     # as in frechet_distance
    # rounded: the same slices in another order tie, rather than rank by their sums' rounding
    ranks = np.stack([stats.rankdata(np.round([row["distance_to_real"][metric] for row in rows], 9))
                      for metric in metrics])
    for row, rank_sum in zip(rows, ranks.sum(0)):     # summed first: tied settings tie exactly
        row["mean_rank"] = float(rank_sum) / len(metrics)
    best = min(rows, key=lambda row: row["mean_rank"])      # the first listed wins a tie
    return best["setting"], rows


def choose_on_validate(sample_images, settings, first_stage_config, ckpt_dir, device, seed=0):
    """choose_setting (settings sampled from `seed`) with the brain critic and the real train /
    validate brains of the data a first stage was trained on; sample_images(setting) -> images
    (V * Z, 1, H, W), whole volumes in z order. One setting needs no search (and no critic): (it, [])."""
    if len(settings) == 1:
        return settings[0], []
    critic, data_dir, img_size = load_first_stage_critic(first_stage_config, ckpt_dir, device)
    train_volumes, validate_volumes = (dataset.OasisSlices(split, data_dir, img_size).volumes()
                                       for split in ("train", "validate"))

    def sample(setting):
        return sample_images(setting).float().cpu().unflatten(0, (-1, dataset.SLICES_PER_BRAIN))

    return choose_setting(sample, settings, critic, validate_volumes, train_volumes, seed)


def format_table(results, reference="real test"):
    """The results of evaluate_sources as one text table: figure +- jackknife spread per source,
    and the reference brains' own figures in the last row."""
    columns = [(metric, title, style) for metric, title, style in SHOWN
               if any(metric in s["figures"] for s in results["sources"].values())]
    widths = [max(len(title), 14) for _, title, _ in columns]
    names = list(results["sources"]) + [f"{reference} (reference)"]
    name_width = max(map(len, names))
    lines = [" " * name_width + "  " + "  ".join(title.rjust(w) for (_, title, _), w in zip(columns, widths))]
    for name in names:
        entry = results["sources"].get(name, {"figures": results["real_test"], "spread": {}})
        cells = []
        for (metric, _, style), width in zip(columns, widths):
            if metric not in entry["figures"]:
                cells.append("-".rjust(width))
                continue
            spread = entry["spread"].get(metric)
            text = style.format(entry["figures"][metric])
            cells.append((text + ("" if spread is None else " +-" + style.format(spread))).rjust(width))
        lines.append(name.ljust(name_width) + "  " + "  ".join(cells))
    lines.append("Frechet distance on the brain critic's features, over their total variance; tissue W1 in percentage points of slice area; "
                 "sharpness 1 = real; detail kurtosis 3 = Gaussian speckle; memorised: real held-out brains reach "
                 f"{results['real_test']['memorisation_by_chance']:.0%} by chance; +- jackknife standard error over "
                 "volumes; * favours blur, kept as a secondary figure")
    return "\n".join(lines)
