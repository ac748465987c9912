"""Latent diffusion: a small z-conditioned U-Net and the DDPM / DDIM machinery around it, with
classifier-free guidance on z (Ho & Salimans 2022); how stable_diffusion.py's config builds them,
how its checkpoints load, and sampling volumes decoded by the first stage."""
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import dataset
import util
from model_VAE import VQVAE
from module import (AttentionBlock, ConditionEmbedding, Downsample, ResBlock, Upsample, embed_z, guide, group_norm, hide_z,
                    volume_noise, with_null_z)

NUM_Z = dataset.SLICES_PER_BRAIN


class FullResolutionHead(nn.Module):
    """A folded U-Net's correction at the latents' own resolution: one conditioned res block of
    `channels` over the noisy latents and the U-Net's last features unfolded, added to its
    prediction (zero at the start). Folded, the p x p vectors of a patch are read off one feature
    map each, their errors independent: on a 32x32 grid the samples strayed off the codebook
    (16% of their variance, against 2% for encoded slices) and their snapped codes decoded to
    speckle. This lets neighbouring vectors agree, for 6-9% more time a step."""

    def __init__(self, latent_channels, unfolded_channels, channels, cond_dim):
        super().__init__()
        self.conv_in = nn.Conv2d(latent_channels + unfolded_channels, channels, 3, padding=1)
        self.block = ResBlock(channels, channels, cond_dim)
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, latent_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, unfolded_features, cond):
        h = self.block(self.conv_in(torch.cat([x, unfolded_features], dim=1)), cond)
        return self.conv_out(F.silu(self.norm_out(h)))


class LatentUNet(nn.Module):
    """U-Net on first-stage latents. The timestep and the slice index z are embedded (sinusoid +
    MLP) and summed into one condition vector that every res block receives; z = module.NULL_Z adds
    nothing (trained on a share of the steps, it gives classifier-free guidance its unconditional
    prediction). Per level: res blocks (+ attention at the lowest level); skip connections are
    concatenated on the way up. `patch_size` p > 1 folds each p x p patch of latents into channels
    before the first level and unfolds the output (space-to-depth, as DiT's patches): a 32x32
    latent grid then costs what a 16x16 one does; `head_channels` > 0 adds a FullResolutionHead
    of that width (p > 1 only)."""

    def __init__(self, in_channels, base_channels=32, channel_mults=(1, 2), num_res_blocks=1, attention=True,
                 num_timesteps=1000, num_z_positions=32, patch_size=1, head_channels=0):
        super().__init__()
        self.patch_size = patch_size
        cond_dim = 4 * base_channels
        self.time_embedding = ConditionEmbedding(num_timesteps, cond_dim)
        self.z_embedding = ConditionEmbedding(num_z_positions, cond_dim) if num_z_positions else None
        widths = [base_channels * mult for mult in channel_mults]
        lowest = len(widths) - 1
        self.conv_in = nn.Conv2d(in_channels * patch_size ** 2, widths[0], 3, padding=1)
        self.down, skip_channels, channels = nn.ModuleList(), [widths[0]], widths[0]
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(channels, width, cond_dim))
                channels = width
                if attention and level == lowest:
                    self.down.append(AttentionBlock(channels))
                skip_channels.append(channels)
            if level < lowest:
                self.down.append(Downsample(channels))
                skip_channels.append(channels)
        self.middle = nn.ModuleList([ResBlock(channels, channels, cond_dim)]
                                    + ([AttentionBlock(channels)] if attention else [])
                                    + [ResBlock(channels, channels, cond_dim)])
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(channels + skip_channels.pop(), widths[level], cond_dim))
                channels = widths[level]
                if attention and level == lowest:
                    self.up.append(AttentionBlock(channels))
            if level > 0:
                self.up.append(Upsample(channels))
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, in_channels * patch_size ** 2, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)   # starts by predicting zero noise
        nn.init.zeros_(self.conv_out.bias)
        self.head = FullResolutionHead(in_channels, channels // patch_size ** 2, head_channels, cond_dim) \
            if head_channels else None

    def forward(self, x, t, z):
        """Noisy latents (B, C, h, w), timesteps (B,), slice indices (B,) or module.NULL_Z -> the
        prediction (noise or v)."""
        cond = self.time_embedding(t)
        if self.z_embedding is not None:
            cond = cond + embed_z(self.z_embedding, z)
        h = self.conv_in(F.pixel_unshuffle(x, self.patch_size))
        skips = [h]
        for layer in self.down:
            h = layer(h, cond) if isinstance(layer, ResBlock) else layer(h)
            if not isinstance(layer, AttentionBlock):
                skips.append(h)
        for layer in self.middle:
            h = layer(h, cond) if isinstance(layer, ResBlock) else layer(h)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), cond)
            else:
                h = layer(h)
        h = F.silu(self.norm_out(h))
        out = F.pixel_shuffle(self.conv_out(h), self.patch_size)
        if self.head is not None:
            out = out + self.head(x, F.pixel_shuffle(h, self.patch_size), cond)
        return out


class GaussianDiffusion(nn.Module):
    """DDPM (Ho et al. 2020) with a linear beta schedule; ancestral DDPM sampling over all
    steps, or DDIM (Song et al. 2021, eta = 0) over a few. The network predicts the noise
    ("eps", as the original) or v = sqrt(abar) eps - sqrt(1 - abar) x_0 ("v", Salimans & Ho
    2022): near t = T an eps-model's x_0 is its output's tiny remainder divided by sqrt(abar_T)
    = 0.006, so small errors there blow up; v keeps x_0 = sqrt(abar) x_t - sqrt(1 - abar) v
    well conditioned at every t."""

    def __init__(self, num_timesteps=1000, beta_start=1e-4, beta_end=0.02, prediction="v"):
        super().__init__()
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.num_timesteps, self.prediction = num_timesteps, prediction
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)

    @staticmethod
    def _at(values, t):
        return values[t][:, None, None, None]

    def add_noise(self, x0, t, noise):
        """q(x_t | x_0): sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        abar = self._at(self.alphas_cumprod, t)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def loss(self, model, x0, z, loss_type="mse", generator=None, z_drop=0.0):
        """Loss on the model's prediction (noise or v) at uniformly drawn timesteps; a share
        z_drop of the items is told module.NULL_Z instead of its z (guidance's unconditional branch)."""
        z = hide_z(z, z_drop, generator)
        t = torch.randint(0, self.num_timesteps, (len(x0),), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        predicted = model(self.add_noise(x0, t, noise), t, z).float()
        if self.prediction == "eps":
            target = noise
        else:
            abar = self._at(self.alphas_cumprod, t)
            target = abar.sqrt() * noise - (1 - abar).sqrt() * x0
        return F.mse_loss(predicted, target) if loss_type == "mse" else F.l1_loss(predicted, target)

    def _spaced_timesteps(self, steps, device=None):
        """`steps` timesteps from num_timesteps - 1 down to 0, evenly spaced (both samplers' schedule)."""
        return torch.linspace(self.num_timesteps - 1, 0, steps, device=device).round().long()

    def _predict_x0(self, model, x, t, z, x0_bound, guidance=1.0):
        """The model's estimate of x_0 from x_t, clipped to +-x0_bound (DDPM's `clip_denoised`,
        for data whose range is not [-1, 1]). guidance w != 1: classifier-free guidance, the
        unconditional prediction moved w times the way z moves it (one batch for both)."""
        abar = self._at(self.alphas_cumprod, t)
        if guidance == 1.0:
            out = model(x, t, z).float()
        else:
            out = guide(model(torch.cat([x, x]), torch.cat([t, t]), with_null_z(z)), guidance)
        if self.prediction == "eps":
            x0 = (x - (1 - abar).sqrt() * out) / abar.sqrt()
        else:
            x0 = abar.sqrt() * x - (1 - abar).sqrt() * out
        return x0 if x0_bound is None else x0.clamp(-x0_bound, x0_bound)

    @torch.no_grad()
    def sample_ddpm(self, model, shape, z, x0_bound=None, noise_groups=0, keep_every=0, progress=False,
                    steps=None, guidance=1.0):
        """Ancestral sampling, each step from the posterior q(x_prev | x_t, x_0) at the model's
        x_0: through all num_timesteps steps, or (`steps` fewer) through evenly spaced ones with
        the posterior of the respaced schedule (Nichol & Dhariwal 2021), the same arithmetic.
        `noise_groups` = G: the batch is G volumes one after another, each of whose slices
        share one noise trajectory (the original's way to make the 32 slices of a volume one
        brain); 0: independent noise for every item. `guidance`: see _predict_x0. Returns the final latents and, with
        keep_every > 0, pure noise and every keep_every-th state after it (counted back from
        the last, which is always kept)."""
        steps = steps or self.num_timesteps
        timesteps = self._spaced_timesteps(steps, z.device)
        abars = self.alphas_cumprod[timesteps]
        abars_previous = torch.cat([abars[1:], abars.new_ones(1)])
        x = volume_noise(torch.randn, shape, noise_groups, z.device)
        states = [x] if keep_every else []
        for i in tqdm(range(steps), desc=f"DDPM-{steps}", leave=False, disable=not progress):
            t = timesteps[i].expand(shape[0])
            x0 = self._predict_x0(model, x, t, z, x0_bound, guidance)
            abar, abar_previous = abars[i], abars_previous[i]
            beta = 1 - abar / abar_previous
            x = (beta * abar_previous.sqrt() * x0 + (1 - abar_previous) * (1 - beta).sqrt() * x) / (1 - abar)
            if i < steps - 1:
                variance = beta * (1 - abar_previous) / (1 - abar)
                x = x + variance.sqrt() * volume_noise(torch.randn, shape, noise_groups, z.device)
            if keep_every and (steps - 1 - i) % keep_every == 0:
                states.append(x)
        return x, states

    @torch.no_grad()
    def sample_ddim(self, model, shape, z, steps=50, x0_bound=None, noise_groups=0, guidance=1.0):
        """Deterministic DDIM (eta = 0) over `steps` evenly spaced timesteps; `noise_groups` and
        `guidance` as in sample_ddpm."""
        x = volume_noise(torch.randn, shape, noise_groups, z.device)
        timesteps = self._spaced_timesteps(steps).tolist()
        for i, current in enumerate(timesteps):
            t = torch.full((shape[0],), current, device=z.device, dtype=torch.long)
            x0 = self._predict_x0(model, x, t, z, x0_bound, guidance)
            abar = self._at(self.alphas_cumprod, t)
            eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
            abar_next = self.alphas_cumprod[timesteps[i + 1]] if i + 1 < steps else self.alphas_cumprod.new_tensor(1.0)
            x = abar_next.sqrt() * x0 + (1 - abar_next).sqrt() * eps
        return x


# ----------------------------------------------------------------------------- from a config / checkpoint
def diffusion_latents(collected):
    """The latents the U-Net models: VQVAE pre-quantisation latents, or VAE posterior means
    (the collected VAE latents hold mean and log-variance stacked on channels)."""
    latents = collected["latents"]
    return latents if collected["indices"] is not None else latents[:, :latents.shape[1] // 2]


def unet_args(config, latent_shape):
    """LatentUNet's arguments for a config and the first stage's latents (C, h, w), after checking
    the rules the constants must follow: the U-Net folds PATCH_SIZE x PATCH_SIZE patches into
    channels, halves the grid at each of its len(CHANNEL_MULTS) - 1 downsamplings and must
    restore it exactly for the skips; HEAD_CHANNELS acts only on folded latents."""
    util.check_positive_ints(config, ("BASE_CHANNELS",))
    mults = util.checked_channel_mults(config)
    if type(config["RES_BLOCKS"]) is not int or config["RES_BLOCKS"] < 0:
        raise util.UserError(f"RES_BLOCKS must be an integer >= 0, got {config['RES_BLOCKS']!r}")
    channels, height, width = latent_shape
    patch = util.checked_patch_size(config, (height, width), "latent grid")
    factor = patch * 2 ** (len(mults) - 1)
    if height % factor or width % factor:
        most = next(levels for levels in range(len(mults), 0, -1) if height % (patch * 2 ** (levels - 1)) == 0
                    and width % (patch * 2 ** (levels - 1)) == 0)
        raise util.UserError(f"CHANNEL_MULTS has {len(mults)} levels, so the U-Net needs latents whose sides are a "
                             f"multiple of PATCH_SIZE * 2^(len(CHANNEL_MULTS) - 1) = {factor}; the first stage's are "
                             f"{height}x{width}: use at most {most} levels, e.g. {tuple(mults[:most])}")
    head = config["HEAD_CHANNELS"] if patch > 1 else 0
    if type(head) is not int or head < 0:
        raise util.UserError(f"HEAD_CHANNELS must be an integer >= 0 (0: no full-resolution head), got {head!r}")
    if head and config["BASE_CHANNELS"] * mults[0] % patch ** 2:
        raise util.UserError(f"the full-resolution head (HEAD_CHANNELS={head}) unfolds the U-Net's first level, "
                             f"BASE_CHANNELS * CHANNEL_MULTS[0] = {config['BASE_CHANNELS'] * mults[0]} channels, "
                             f"into PATCH_SIZE^2 = {patch ** 2} places: make it a multiple of {patch ** 2}, "
                             f"or HEAD_CHANNELS=0")
    return dict(in_channels=channels, base_channels=config["BASE_CHANNELS"], channel_mults=tuple(mults),
                num_res_blocks=config["RES_BLOCKS"], attention=config["ATTENTION"],
                num_timesteps=config["NUM_TIMESTEPS"], num_z_positions=NUM_Z if config["Z_CONDITIONING"] else None,
                patch_size=patch, head_channels=head)


def build_diffusion(config):
    """The noise schedule and parameterisation a config describes, after checking them."""
    util.check_positive_ints(config, ("NUM_TIMESTEPS",))
    if not 0 < config["BETA_START"] < config["BETA_END"] < 1:
        raise util.UserError(f"the betas must satisfy 0 < BETA_START < BETA_END < 1, e.g. 1e-4 and 0.02; got "
                             f"BETA_START={config['BETA_START']}, BETA_END={config['BETA_END']}")
    if config["PREDICTION"] not in ("v", "eps"):
        raise util.UserError(f"PREDICTION must be 'v' or 'eps', got {config['PREDICTION']!r}")
    return GaussianDiffusion(config["NUM_TIMESTEPS"], config["BETA_START"], config["BETA_END"], config["PREDICTION"])


def load_diffusion(path, device):
    """A checkpoint of stable_diffusion.py for sampling: (EMA U-Net in eval mode, diffusion, checkpoint)."""
    checkpoint = util.load_checkpoint(path)
    unet = LatentUNet(**checkpoint["model_args"])
    util.load_weights(unet, checkpoint["ema_model"], path)
    return unet.to(device).eval(), build_diffusion(checkpoint["config"]).to(device), checkpoint


def unnormalise(latents, stats):
    """Sampled (normalised) latents back in the first stage's units (stats: a checkpoint's "stats")."""
    return latents * stats["latent_std"].to(latents.device) + stats["latent_mean"].to(latents.device)


def decode_latents(first_stage, latents, stats, z, snap_temperature=0.0, noise_groups=0):
    """Images from sampled (normalised) latents: un-normalise, then decode; a VQVAE first snaps
    each vector to a code, the nearest or, with snap_temperature > 0, one drawn by proximity,
    the slices of each of `noise_groups` volumes alike (VQVAE.snap)."""
    latents = unnormalise(latents, stats)
    if isinstance(first_stage, VQVAE):
        latents = first_stage.snap(latents, snap_temperature, noise_groups)
    return first_stage.decode(latents, z)


@torch.no_grad()
def sample_latents(model, diffusion, stats, device, volumes=1, steps=50, guidance=1.0):
    """`volumes` volumes of 32 slices (z = 0..31) of normalised latents by DDIM with
    classifier-free guidance scale `guidance`, each volume's slices sharing one noise trajectory:
    (latents, z). `model`: an EMA U-Net in eval mode; `stats`: the latent normalisation
    ({"latent_shape", "latent_mean", "latent_std", "x0_bound"})."""
    z = torch.arange(NUM_Z, device=device).repeat(volumes)
    latents = diffusion.sample_ddim(model, (len(z),) + tuple(stats["latent_shape"]), z, steps,
                                    x0_bound=stats["x0_bound"], noise_groups=volumes, guidance=guidance)
    return latents, z


@torch.no_grad()
def sample_volumes(model, diffusion, first_stage, stats, device, volumes=1, steps=50, guidance=1.0,
                   snap_temperature=0.0):
    """sample_latents decoded to images (volumes * 32, 1, H, W) (decode_latents)."""
    latents, z = sample_latents(model, diffusion, stats, device, volumes, steps, guidance)
    return decode_latents(first_stage, latents, stats, z, snap_temperature, noise_groups=volumes)
