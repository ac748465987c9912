"""Network building blocks shared by the first-stage autoencoders, the discriminator, the
transformer prior and the latent diffusion U-Net: condition embedding, res block, attention,
resampling, classifier-free guidance on z, noise shared by a volume's slices, and a vector
quantizer that keeps its whole codebook in use."""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import util


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that stays in autocast's dtype on a GPU. CUDA autocast runs group_norm in
    fp32 (CPU autocast does not), so every SiLU, scale-shift and residual add after a norm would
    move twice the bytes and each conv would first cast back; the kernel sums its statistics in
    fp32 either way."""

    def forward(self, x):
        if not (x.is_cuda and torch.is_autocast_enabled("cuda")):
            return super().forward(x)
        dtype = torch.get_autocast_dtype("cuda")
        with torch.autocast("cuda", enabled=False):
            return F.group_norm(x.to(dtype), self.num_groups, self.weight.to(dtype), self.bias.to(dtype), self.eps)


def group_norm(channels):
    """GroupNorm with 32 groups, or the largest divisor of `channels` below that."""
    groups = max(g for g in range(1, 33) if channels % g == 0)
    return GroupNorm(groups, channels, eps=1e-6)


NULL_Z = -1                  # the slice index that means "no z": a second stage's unconditional branch


def hide_z(z, share, generator=None):
    """Slice indices z (B,) with a random `share` of them replaced by NULL_Z: trained on those, a
    model learns the unconditional prediction that classifier-free guidance (Ho & Salimans 2022)
    moves away from."""
    if not share:
        return z
    return torch.where(torch.rand(len(z), device=z.device, generator=generator) < share, NULL_Z, z)


def embed_z(embedding, z):
    """embedding(z) for slice indices z (B,), zero where z is NULL_Z (nothing is said of z)."""
    return embedding(z.clamp(min=0)) * (z != NULL_Z)[:, None]


def with_null_z(z):
    """z (B,) followed by as many NULL_Z: one batch for guidance's conditional and unconditional passes."""
    return torch.cat([z, torch.full_like(z, NULL_Z)])


def guide(outputs, scale):
    """Classifier-free guidance: a model's outputs on a with_null_z batch (2B, ...) -> the
    unconditional ones moved `scale` times the way z moves them (B, ...), in fp32."""
    conditional, unconditional = outputs.float().chunk(2)
    return unconditional + scale * (conditional - unconditional)


def volume_noise(draw, shape, noise_groups, device=None):
    """draw(shape) (torch.randn, torch.rand), except that with noise_groups = G > 0 the batch
    (shape[0]) is G volumes one after another and every slice of a volume gets its volume's
    noise: a sampler that turns like noise into like outputs then makes a volume's neighbouring
    slices alike (one brain), while each slice alone is still drawn from its own law."""
    if not noise_groups:
        return draw(shape, device=device)
    noise = draw((noise_groups, 1) + tuple(shape[1:]), device=device)
    return noise.expand((noise_groups, shape[0] // noise_groups) + tuple(shape[1:])).reshape(shape)


def gumbel_max(logits, uniforms):
    """A draw from softmax(logits) along the last dimension: the argmax of the logits plus
    Gumbel noise -log(-log u), for `uniforms` u in [0, 1) of the logits' shape. Rows given the
    same uniforms draw alike where their laws are alike: unlike inverting each row's cumulative
    law at one uniform (VectorQuantizer.draw_code), this needs no order of the categories, so two
    laws that differ on a few codes still agree on the rest."""
    gumbel = -torch.log(-torch.log(uniforms.clamp(min=torch.finfo(uniforms.dtype).tiny)))
    return (logits + gumbel).argmax(-1)


class ConditionEmbedding(nn.Module):
    """Integer condition (slice z-index, diffusion timestep) -> vector: a fixed sinusoidal table
    followed by a small MLP, the way diffusion models embed the timestep."""

    def __init__(self, num_positions, dim):
        super().__init__()
        self.register_buffer("table", util.sinusoidal_embedding(torch.arange(num_positions), dim),
                             persistent=False)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, positions):
        return self.mlp(self.table[positions])


class ResBlock(nn.Module):
    """Two 3x3 convs with GroupNorm + SiLU and a residual path. An optional condition vector
    sets a per-channel scale and shift right after the second norm (ADM's scale-shift norm):
    a shift added before a GroupNorm whose groups hold one channel each would be normalised away."""

    def __init__(self, in_channels, out_channels, cond_dim=None, dropout=0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.cond_proj = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * out_channels)) if cond_dim else None
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x, cond=None):
        h = self.norm2(self.conv1(F.silu(self.norm1(x))))
        if self.cond_proj is not None:
            scale, shift = rearrange(self.cond_proj(cond), "b (two c) -> two b c 1 1", two=2)
            h = h * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, residual."""

    def __init__(self, channels, num_heads=1):
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        height = x.shape[2]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three heads c) h w -> three b heads (h w) c",
                            three=3, heads=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(rearrange(out, "b heads (h w) c -> b (heads c) h w", h=height))


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv (to out_channels: narrowing here keeps the costly
    high-resolution convs thin)."""

    def __init__(self, channels, out_channels=None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _all_reduce_sum(tensor):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def _broadcast(tensor):
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(tensor, src=0)
    return tensor


def argmin_rows(scores, block=32):
    """scores.argmin(1), ties to the first, for a (N, K) matrix: the least of each block of `block`
    columns, then the first minimum inside the best block. On the CPU argmin over a 1,024-wide row
    ran ~10x slower than amin: this cut the quantizer's share of a 32x32-grid VQVAE training step
    from 23% to ~6%."""
    rows, width = scores.shape
    if width % block:
        return scores.argmin(1)
    blocks = scores.view(rows, width // block, block)
    best_block = blocks.amin(2).argmin(1)
    return best_block * block + blocks[torch.arange(rows, device=scores.device), best_block].argmin(1)


class VectorQuantizer(nn.Module):
    """Nearest-code vector quantisation with a straight-through gradient.

    The original repo learned its codebook by gradient and ended with a handful of live codes:
    a code no encoder output is near never receives gradient and stays dead. Here:
    - the codebook starts from encoder outputs of the first training batch (data init), so every
      code begins where the data is;
    - codes follow exponential moving averages of the outputs assigned to them (EMA updates,
      VQ-VAE-2 style), which is stabler than a codebook loss and needs no codebook gradient;
    - a code whose EMA usage falls below `dead_code_threshold` vectors per step is restarted
      on a random encoder output of the current batch.
    Only the commitment loss (weight beta) trains the encoder. Under torch.distributed the EMA
    statistics are summed over processes and restarts come from rank 0, so every process keeps
    the same codebook."""

    def __init__(self, num_codes, code_dim, commitment_weight=0.25, ema_decay=0.99,
                 dead_code_threshold=1.0, eps=1e-5):
        super().__init__()
        self.num_codes, self.code_dim = num_codes, code_dim
        self.commitment_weight, self.ema_decay = commitment_weight, ema_decay
        self.dead_code_threshold, self.eps = dead_code_threshold, eps
        self.register_buffer("codebook", torch.randn(num_codes, code_dim))
        self.register_buffer("ema_cluster_size", torch.ones(num_codes))
        self.register_buffer("ema_code_sum", self.codebook.clone())
        self.register_buffer("initialised", torch.tensor(False))
        self._seen_initialised = False     # reading the buffer on a GPU waits for it: once is enough

    def _code_scores(self, vectors):
        """|v - e|^2 - |v|^2 = |e|^2 - 2 v.e for each row v of vectors (N, code_dim) and code e, in
        fp32: |v|^2 is the same for every code of a row, so one fused addmm is all an argmin or a
        softmax over codes needs (on a 32x32 latent grid the two passes over the N x codes matrix
        it saves had cost a fifth of a CPU training step)."""
        codebook = self.codebook.float()
        return torch.addmm(codebook.pow(2).sum(1)[None], vectors.float(), codebook.T, alpha=-2)

    def nearest_code(self, vectors, rows_per_chunk=2048):
        """Index of the nearest code (Euclidean) for each row of vectors (N, code_dim), a chunk of
        rows at a time so that its scores stay in cache (a training step's 16,384 x 1,024 matrix
        at once spent most of its time allocating and reading memory)."""
        return torch.cat([argmin_rows(self._code_scores(chunk)) for chunk in vectors.split(rows_per_chunk)])

    def draw_code(self, vectors, temperature, uniforms):
        """A code index per row of vectors (N, code_dim), drawn by proximity: with d the squared
        distances of a row to the codes, p(code) is proportional to
        exp(-(d_code - d_nearest) / (temperature * d_nearest)), so a code whose squared distance
        exceeds the nearest's by `temperature` times the nearest's is e^-1 as likely; a row that
        sits on a code keeps it. Temperature 0 is nearest_code (`uniforms` unused: None). Each
        row's draw inverts its cumulative law at its uniform in [0, 1) (`uniforms` (N,)); rows
        given the same uniform and alike distances draw alike."""
        if temperature == 0:
            return self.nearest_code(vectors)
        scores = self._code_scores(vectors)
        nearest = scores.min(1, keepdim=True).values
        nearest_distance = (nearest + vectors.float().pow(2).sum(1, keepdim=True)).clamp(min=1e-12)
        cumulative = torch.softmax((nearest - scores) / (temperature * nearest_distance), 1).cumsum(1)
        return torch.searchsorted(cumulative, uniforms[:, None].to(cumulative)).clamp(max=self.num_codes - 1)[:, 0]

    def embed_indices(self, indices):
        """Code indices (B, H, W) -> quantised latents (B, code_dim, H, W)."""
        return rearrange(F.embedding(indices, self.codebook), "b h w d -> b d h w")

    def _random_rows(self, vectors, count):
        """`count` distinct random rows of vectors (repeats only when there are too few), taken
        from rank 0 so that every process gets the same."""
        if count <= len(vectors):
            rows = vectors[torch.randperm(len(vectors), device=vectors.device)[:count]]
        else:
            rows = vectors[torch.randint(len(vectors), (count,), device=vectors.device)]
        return _broadcast(rows.contiguous())

    @torch.no_grad()
    def _initialise(self, vectors):
        self.codebook.copy_(self._random_rows(vectors, self.num_codes))
        self.ema_code_sum.copy_(self.codebook)
        self.ema_cluster_size.fill_(1.0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def _ema_update(self, vectors, indices):
        """One EMA step of the code statistics and dead-code restarts, with nothing read back to
        the host (on a GPU, bincount, `dead.any()` and a count of dead codes would each make the
        CPU wait for the queued kernels every step): every code draws a restart candidate and
        only the dead ones take it."""
        cluster_size = torch.zeros_like(self.ema_cluster_size).index_add_(
            0, indices, torch.ones_like(indices, dtype=self.ema_cluster_size.dtype))
        code_sum = torch.zeros_like(self.ema_code_sum).index_add_(0, indices, vectors)
        self.ema_cluster_size.lerp_(_all_reduce_sum(cluster_size), 1 - self.ema_decay)
        self.ema_code_sum.lerp_(_all_reduce_sum(code_sum), 1 - self.ema_decay)
        # Laplace smoothing keeps rarely used codes from dividing by ~0
        total = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
        self.codebook.copy_(self.ema_code_sum / smoothed[:, None])
        dead = (self.ema_cluster_size < self.dead_code_threshold)[:, None]
        restarted = self._random_rows(vectors, self.num_codes)
        self.codebook.copy_(torch.where(dead, restarted, self.codebook))
        self.ema_code_sum.copy_(torch.where(dead, restarted, self.ema_code_sum))
        self.ema_cluster_size.clamp_(min=self.dead_code_threshold)     # the restarted ones: at the threshold

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(self, latents):
        """latents (B, code_dim, H, W) -> (quantised with straight-through gradient, indices
        (B, H, W), commitment loss). In training mode the codebook is updated afterwards.
        Runs in fp32 under autocast: distances and EMA sums need the precision."""
        batch, _, height, width = latents.shape
        vectors = rearrange(latents, "b d h w -> (b h w) d").float()
        if self.training and not self._seen_initialised:
            if not self.initialised:
                self._initialise(vectors.detach())
            self._seen_initialised = True
        indices = self.nearest_code(vectors)
        quantised = rearrange(self.codebook[indices], "(b h w) d -> b d h w", b=batch, h=height)
        if self.training:
            self._ema_update(vectors.detach(), indices)
        latents = latents.float()
        commitment = self.commitment_weight * F.mse_loss(latents, quantised)
        quantised = latents + (quantised - latents).detach()
        return quantised, rearrange(indices, "(b h w) -> b h w", b=batch, h=height), commitment


def codebook_stats(code_counts):
    """Usage of a codebook from its code counts (any shape ending in num_codes):
    active_share = share of codes used at least once, perplexity = exp(entropy of usage),
    which equals the number of codes for perfectly even use."""
    counts = code_counts.reshape(-1, code_counts.shape[-1]).sum(0).double()
    probabilities = counts / counts.sum().clamp(min=1)
    entropy = -(probabilities * probabilities.clamp(min=1e-12).log()).sum()
    return {"active_share": (counts > 0).double().mean().item(), "perplexity": math.exp(entropy.item())}


def code_counts_per_position(indices, num_codes):
    """(B, h, w) code indices -> (h, w, num_codes) counts: each position's code histogram."""
    _, height, width = indices.shape
    position = torch.arange(height * width, device=indices.device).view(height, width)
    flat = (position * num_codes + indices).flatten()
    # scatter_add, not bincount: bincount on CUDA reads the largest index back to the CPU (a sync)
    counts = torch.zeros(height * width * num_codes, dtype=torch.long, device=indices.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat)).view(height, width, num_codes)
