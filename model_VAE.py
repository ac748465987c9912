"""First-stage autoencoders: `VAE` and `VQVAE` on one latent-diffusion-style encoder / decoder,
optionally conditioned on the slice z-index in every res block; how pre_train.py's config builds
them, how its checkpoints load, and their reconstruction SSIM."""
import os

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import dataset
import util
from module import (AttentionBlock, ConditionEmbedding, Downsample, ResBlock, Upsample, VectorQuantizer, group_norm,
                    volume_noise)

NUM_Z = dataset.SLICES_PER_BRAIN


def _per_level(num_res_blocks, levels):
    """An int (same count at every level) or a tuple of one count per level."""
    counts = (num_res_blocks,) * levels if isinstance(num_res_blocks, int) else tuple(num_res_blocks)
    if len(counts) != levels:
        raise ValueError(f"{counts} res-block counts for {levels} levels")
    return counts


class ConditionedSequence(nn.Module):
    """Layers applied in order; res blocks also get the condition vector."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x, cond):
        for layer in self.layers:
            x = layer(x, cond) if isinstance(layer, ResBlock) else layer(x)
        return x


class Encoder(nn.Module):
    """Space-to-depth by `patch_size`, conv_in, then per level: res blocks (+ attention at the
    lowest level), a stride-2 conv between levels; middle res-attention-res; norm, SiLU,
    conv_out to `out_channels`."""

    def __init__(self, in_channels, out_channels, base_channels, channel_mults, num_res_blocks,
                 attention, cond_dim, patch_size):
        super().__init__()
        levels = len(channel_mults)
        self.patch_size = patch_size
        self.conv_in = nn.Conv2d(in_channels * patch_size ** 2, base_channels, 3, padding=1)
        layers, channels = [], base_channels
        for level, (mult, count) in enumerate(zip(channel_mults, _per_level(num_res_blocks, levels))):
            for _ in range(count):
                layers.append(ResBlock(channels, base_channels * mult, cond_dim))
                channels = base_channels * mult
                if attention and level == levels - 1:
                    layers.append(AttentionBlock(channels))
            if level < levels - 1:
                layers.append(Downsample(channels))
        layers += [ResBlock(channels, channels, cond_dim)] + ([AttentionBlock(channels)] if attention else []) \
            + [ResBlock(channels, channels, cond_dim)]
        self.body = ConditionedSequence(layers)
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x, cond):
        x = self.conv_in(F.pixel_unshuffle(x, self.patch_size))
        return self.conv_out(F.silu(self.norm_out(self.body(x, cond))))


class Decoder(nn.Module):
    """The encoder mirrored: conv_in at the lowest level, middle, per level res blocks and a
    nearest-neighbour upsampling conv; norm, SiLU, conv_out, depth-to-space by `patch_size`,
    tanh (images live in [-1, 1])."""

    def __init__(self, in_channels, out_channels, base_channels, channel_mults, num_res_blocks,
                 attention, cond_dim, patch_size):
        super().__init__()
        levels = len(channel_mults)
        self.patch_size = patch_size
        channels = base_channels * channel_mults[-1]
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        layers = [ResBlock(channels, channels, cond_dim)] + ([AttentionBlock(channels)] if attention else []) \
            + [ResBlock(channels, channels, cond_dim)]
        counts = _per_level(num_res_blocks, levels)
        for level in reversed(range(levels)):
            for _ in range(counts[level]):
                layers.append(ResBlock(channels, base_channels * channel_mults[level], cond_dim))
                channels = base_channels * channel_mults[level]
                if attention and level == levels - 1:
                    layers.append(AttentionBlock(channels))
            if level > 0:
                layers.append(Upsample(channels, base_channels * channel_mults[level - 1]))
                channels = base_channels * channel_mults[level - 1]
        self.body = ConditionedSequence(layers)
        self.norm_out = group_norm(channels)
        self.conv_out = nn.Conv2d(channels, out_channels * patch_size ** 2, 3, padding=1)

    def forward(self, latents, cond):
        h = self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(latents), cond))))
        return torch.tanh(F.pixel_shuffle(h, self.patch_size))


class Autoencoder(nn.Module):
    """What VAE and VQVAE share: encoder, decoder and the optional z-index embeddings.
    forward(images, z) returns (reconstruction, regulariser loss, code indices or None).
    The downsampling factor is patch_size * 2 ** (levels - 1): patch_size 2 moves the first
    level to half resolution (space-to-depth in, depth-to-space out), which makes CPU training
    several times faster; the original's design is patch_size 1."""

    def __init__(self, encoder_channels, latent_channels, in_channels=1, base_channels=64,
                 channel_mults=(1, 1, 2, 2, 4), num_res_blocks_encoder=2, num_res_blocks_decoder=3,
                 attention=True, num_z_positions=32, patch_size=1):
        super().__init__()
        self.latent_channels = latent_channels
        self.downsampling_factor = patch_size * 2 ** (len(channel_mults) - 1)
        cond_dim = 4 * base_channels if num_z_positions else None
        # separate embeddings: the decoder must work alone on latents from the second stage
        self.encoder_z_embedding = ConditionEmbedding(num_z_positions, cond_dim) if num_z_positions else None
        self.decoder_z_embedding = ConditionEmbedding(num_z_positions, cond_dim) if num_z_positions else None
        shape = dict(base_channels=base_channels, channel_mults=channel_mults, attention=attention,
                     cond_dim=cond_dim, patch_size=patch_size)
        self.encoder = Encoder(in_channels, encoder_channels, num_res_blocks=num_res_blocks_encoder, **shape)
        self.decoder = Decoder(latent_channels, in_channels, num_res_blocks=num_res_blocks_decoder, **shape)

    @staticmethod
    def _embed(embedding, z):
        return None if embedding is None else embedding(z)

    def run_encoder(self, images, z):
        return self.encoder(images, self._embed(self.encoder_z_embedding, z))

    def decode(self, latents, z):
        """Latents (B, latent_channels, h, w) and z-indices (B,) -> images (B, 1, H, W) in [-1, 1]."""
        return self.decoder(latents, self._embed(self.decoder_z_embedding, z))

    def latent_shape(self, image_size):
        """(channels, h, w) of the latents of image_size x image_size slices."""
        side = image_size // self.downsampling_factor
        return (self.latent_channels, side, side)

    @property
    def last_layer_weight(self):
        """The decoder's final conv weight, where the adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight


class VAE(Autoencoder):
    """Gaussian latents; the encoder gives mean and log-variance (clamped to [-30, 20])."""

    def __init__(self, latent_channels=16, **kwargs):
        super().__init__(2 * latent_channels, latent_channels, **kwargs)

    def encode(self, images, z):
        mean, logvar = self.run_encoder(images, z).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def forward(self, images, z):
        """(reconstruction of a sampled latent, KL to N(0, I) summed over latent dims and
        averaged over the batch, None)."""
        mean, logvar = self.encode(images, z)
        latents = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()
        return self.decode(latents, z), kl, None

    def reconstruct(self, images, z):
        """Deterministic reconstruction from the posterior mean: (images, None)."""
        return self.decode(self.encode(images, z)[0], z), None

    def sample(self, n, z, image_size):
        """n image_size x image_size images decoded from N(0, I) latents at z-indices z (n,)."""
        return self.decode(torch.randn((n,) + self.latent_shape(image_size), device=z.device), z)


class VQVAE(Autoencoder):
    """Latents snapped to a codebook of num_codes x code_dim (see module.VectorQuantizer)."""

    def __init__(self, num_codes=256, code_dim=8, commitment_weight=0.25, **kwargs):
        super().__init__(code_dim, code_dim, **kwargs)
        self.quantizer = VectorQuantizer(num_codes, code_dim, commitment_weight=commitment_weight)

    @property
    def num_codes(self):
        return self.quantizer.num_codes

    def encode(self, images, z):
        """Pre-quantisation latents (B, code_dim, h, w)."""
        return self.run_encoder(images, z)

    def quantize(self, latents):
        """(quantised latents, code indices (B, h, w), commitment loss)."""
        return self.quantizer(latents)

    def snap(self, latents, temperature=0.0, noise_groups=0):
        """Continuous latents (B, code_dim, h, w), e.g. a diffusion's samples, to codebook vectors:
        each to its nearest code (temperature 0) or to one drawn by proximity
        (VectorQuantizer.draw_code). Sampled latents land between codes, and their nearest codes
        alone decode to smoother images than the codes of real slices. `noise_groups` = G: the
        batch is G volumes one after another, whose slices share one uniform per position, so
        that alike slices of a volume draw alike codes (a volume stays one brain); 0: independent
        draws."""
        batch, _, height, width = latents.shape
        uniforms = None
        if temperature > 0:  # the nearest code needs no draw (and takes no RNG)
            uniforms = volume_noise(torch.rand, (batch, height * width), noise_groups, latents.device).flatten()
        indices = self.quantizer.draw_code(rearrange(latents, "b d h w -> (b h w) d"), temperature, uniforms)
        return self.quantizer.embed_indices(indices.view(batch, height, width))

    def off_codebook_share(self, latents):
        """How far latents (B, code_dim, h, w) lie from the codebook: the squared distance of each
        vector to its nearest code, summed, over the vectors' summed squared deviation from their
        mean. Encoder outputs sit near their codes (a few per cent); a diffusion's samples that
        stray between codes score higher, and snap() then has to pick codes for them."""
        latents = latents.float()
        off = (latents - self.snap(latents)).pow(2).sum()
        return (off / (latents - latents.mean((0, 2, 3), keepdim=True)).pow(2).sum()).item()

    def decode_indices(self, indices, z):
        return self.decode(self.quantizer.embed_indices(indices), z)

    def forward(self, images, z):
        quantised, indices, vq_loss = self.quantize(self.encode(images, z))
        return self.decode(quantised, z), vq_loss, indices

    def reconstruct(self, images, z):
        """(reconstruction, code indices)."""
        quantised, indices, _ = self.quantize(self.encode(images, z))
        return self.decode(quantised, z), indices

    @staticmethod
    def sample_code_indices(code_histogram, n):
        """n index grids (n, h, w), each position's code drawn from that position's counts in
        code_histogram (h, w, num_codes), indexed [row, column, code]."""
        height, width, num_codes = code_histogram.shape
        rows = rearrange(code_histogram.float(), "h w k -> (h w) k")
        drawn = torch.multinomial(rows, n, replacement=True)          # (h*w, n)
        return rearrange(drawn, "(h w) n -> n h w", h=height, w=width)

    def sample(self, n, z, code_histogram):
        """n images decoded from codes drawn per position from code_histogram."""
        return self.decode_indices(self.sample_code_indices(code_histogram, n).to(z.device), z)


# ----------------------------------------------------------------------------- from a config / checkpoint
def check_model_config(config):
    """Stop with the rule a first-stage shape constant breaks, before any tensor meets it."""
    if config["MODE"] not in ("VQVAE", "VAE"):
        raise util.UserError(f"MODE must be 'VQVAE' or 'VAE', got {config['MODE']!r}")
    util.check_positive_ints(config, ("IMG_SIZE", "PATCH_SIZE", "BASE_CHANNELS", "NUM_CODES", "CODE_DIM",
                                      "LATENT_CHANNELS"))
    mults = util.checked_channel_mults(config)
    for name in ("ENCODER_RES_BLOCKS", "DECODER_RES_BLOCKS"):
        counts = config[name]
        per_level = counts if isinstance(counts, tuple) else (counts,) * len(mults)
        if len(per_level) != len(mults) or not all(type(c) is int and c >= 0 for c in per_level):
            raise util.UserError(f"{name} must be an integer >= 0 or a tuple of one per level ({len(mults)}, "
                                 f"as in CHANNEL_MULTS), e.g. {(1,) * len(mults)}; got {counts!r}")
    factor = config["PATCH_SIZE"] * 2 ** (len(mults) - 1)
    if config["IMG_SIZE"] % factor:
        below = config["IMG_SIZE"] // factor * factor
        example = f"{below} or {below + factor}" if below else f"{factor}"
        raise util.UserError(f"IMG_SIZE must be a multiple of PATCH_SIZE x 2^(len(CHANNEL_MULTS) - 1) = "
                             f"{config['PATCH_SIZE']} x 2^{len(mults) - 1} = {factor}, the factor the encoder "
                             f"shrinks images by, e.g. {example}; got {config['IMG_SIZE']}")


def build_model(config):
    """The first-stage model a config describes (used again by the second-stage scripts),
    after check_model_config."""
    check_model_config(config)
    common = dict(base_channels=config["BASE_CHANNELS"], channel_mults=tuple(config["CHANNEL_MULTS"]),
                  num_res_blocks_encoder=config["ENCODER_RES_BLOCKS"],
                  num_res_blocks_decoder=config["DECODER_RES_BLOCKS"],
                  attention=config["ATTENTION"], patch_size=config["PATCH_SIZE"],
                  num_z_positions=NUM_Z if config["Z_CONDITIONING"] else None)
    if config["MODE"] == "VQVAE":
        return VQVAE(num_codes=config["NUM_CODES"], code_dim=config["CODE_DIM"], **common)
    return VAE(latent_channels=config["LATENT_CHANNELS"], **common)


@torch.no_grad()
def evaluate_reconstructions(model, loader, device, autocast):
    """Mean per-image SSIM of reconstructions in [0, 1], and the code counts used (VQVAE). In eval
    mode, then back to the mode it was in: a VQVAE in training mode moves its codebook as it encodes."""
    was_training = model.training
    model.eval()
    scores, code_counts = [], None
    for images, _, _, zs in loader:
        images, zs = images.to(device), zs.to(device)
        with autocast():
            reconstruction, indices = model.reconstruct(images, zs)
        scores.append(util.reconstruction_ssim(images, reconstruction))
        if indices is not None:
            counts = torch.bincount(indices.flatten(), minlength=model.num_codes)
            code_counts = counts if code_counts is None else code_counts + counts
    model.train(was_training)
    return torch.cat(scores).mean().item(), code_counts


def load_first_stage(path, device):
    """A first-stage checkpoint (model_ckpt/<run>_best.pt), rebuilt and in eval mode: (model, config).
    The second-stage scripts pass the path stored with the latents, so they decode with the very
    model that encoded them."""
    if not os.path.isfile(path):
        run = os.path.basename(path).removesuffix("_best.pt")
        command = {"vqvae": "python pre_train.py", "vae": "python pre_train.py --MODE=VAE"}.get(
            run, f"python pre_train.py --RUN_NAME={run}")
        raise util.UserError(f"first-stage checkpoint {path} does not exist; train it first ({command}) "
                             f"or set FIRST_STAGE / CKPT_DIR")
    checkpoint = util.load_checkpoint(path)
    model = build_model(checkpoint["config"])
    util.load_weights(model, checkpoint["model"], path)
    return model.to(device).eval().requires_grad_(False), checkpoint["config"]
