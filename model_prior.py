"""The transformer prior over a VQVAE's code grid, conditioned on the slice index z: the model,
how it is built from train_viT.py's config and loaded from its checkpoints, and sampling."""
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import dataset
import util
from module import embed_z, guide, gumbel_max, volume_noise, with_null_z

NUM_Z = dataset.SLICES_PER_BRAIN
SAMPLING_KEYS = ("temperature", "top_p", "guidance")     # what train_viT.py chooses on validate: sample_volumes' kwargs


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention. With a `cache` dict (sampling) the keys and values of
    earlier positions are kept, so each new token costs one position's work. Dropout acts on the
    output, not on the attention weights: with those, PyTorch's CPU attention falls back to its
    slow kernel (a training step took 1.7x as long here)."""

    def __init__(self, dim, num_heads, dropout):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, cache=None):
        q, k, v = rearrange(self.qkv(x), "b n (three heads d) -> three b heads n d", three=3, heads=self.num_heads)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        # a cached step's query is the newest position: it may see every key, so no mask
        out = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None)
        return self.dropout(self.proj(rearrange(out, "b heads n d -> b n (heads d)")))


class TransformerBlock(nn.Module):
    """Pre-norm: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, dim, num_heads, dropout):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = CausalSelfAttention(dim, num_heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x, cache=None):
        x = x + self.attention(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


class CodePrior(nn.Module):
    """p(codes | z) over a latent grid read in raster order of patch_size x patch_size patches.
    The transformer's position i reads z (position 0's start token, and added to every position)
    and the patches before i, and predicts patch i's codes one after another, each from the
    transformer's output plus the codes already drawn in its patch (a small residual MLP, like
    RQ-Transformer's depth step).
    z = module.NULL_Z says nothing of z (a zero start token, no z added): trained on a share of
    slices (train_viT.py's Z_DROP), it gives classifier-free guidance its unconditional logits.
    patch_size 1 is a plain GPT over codes; 2 on a 32x32 grid runs the transformer over 256
    positions instead of 1,024: a quarter of the tokens and a sixteenth of the attention."""

    def __init__(self, num_codes, grid_shape, num_z_positions, num_layers=4, num_heads=4, dim=128, dropout=0.1,
                 patch_size=1):
        super().__init__()
        self.num_codes, self.patch_size = num_codes, patch_size
        self.grid_shape = tuple(grid_shape)
        self.patches_shape = (self.grid_shape[0] // patch_size, self.grid_shape[1] // patch_size)
        self.sequence_length = self.patches_shape[0] * self.patches_shape[1]
        self.codes_per_patch = patch_size ** 2
        # one table per place in the patch, so the sum of a patch's embeddings keeps their order
        self.code_embedding = nn.Embedding(self.codes_per_patch * num_codes, dim)
        self.z_embedding = nn.Embedding(num_z_positions, dim)      # the start token
        # z again at every position: read from the start token alone, the prior drew slices whose
        # shape followed z 29% of the time (43% with it, on validate)
        self.z_condition = nn.Embedding(num_z_positions, dim)
        self.position_embedding = nn.Embedding(self.sequence_length, dim)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(dim, num_heads, dropout) for _ in range(num_layers))
        if patch_size > 1:
            self.in_patch_code_embedding = nn.Embedding(self.codes_per_patch * num_codes, dim)
            self.in_patch_position = nn.Parameter(torch.zeros(self.codes_per_patch, dim))
            self.in_patch_mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(),
                                              nn.Linear(4 * dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_codes, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _place_offsets(self, patches):
        """Patches (B, n, codes_per_patch) as rows of the per-place embedding tables."""
        return patches + torch.arange(self.codes_per_patch, device=patches.device) * self.num_codes

    def _transform(self, tokens, z, start, caches):
        """The transformer's outputs (B, n, dim) after the tokens (B, n, dim) at positions
        start..start+n-1 of slices z (B,)."""
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        x = self.dropout(tokens + self.position_embedding(positions) + embed_z(self.z_condition, z)[:, None])
        for block, cache in zip(self.blocks, caches):
            x = block(x, cache)
        return x

    def _code_logits(self, x, patches):
        """Logits (B, n, codes_per_patch, num_codes) of each code of the patches (B, n, codes_per_patch)
        from the transformer's outputs x (B, n, dim); code j's logits read only the codes before j."""
        if self.patch_size == 1:
            return self.head(self.norm(x))[:, :, None]
        drawn = self.in_patch_code_embedding(self._place_offsets(patches))
        h = x[:, :, None] + self.in_patch_position + drawn.cumsum(2) - drawn     # the codes before j, summed
        return self.head(self.norm(h + self.in_patch_mlp(h)))

    def _patch_logits(self, patches, z):
        """Patches (B, n, codes_per_patch), the first n of a grid, and z (B,) -> their codes' logits."""
        earlier = self.code_embedding(self._place_offsets(patches[:, :-1])).sum(2)
        tokens = torch.cat([embed_z(self.z_embedding, z)[:, None], earlier], dim=1)
        return self._code_logits(self._transform(tokens, z, 0, [None] * len(self.blocks)), patches)

    def forward(self, codes, z, return_nats_per_code=False):
        """Code grids (B, h, w) and z (B,) -> logits (B, h*w, num_codes) in raster order; the logits
        of a code predict it from z, the patches before its patch and the codes before it in its patch.
        With return_nats_per_code: the codes' mean cross-entropy under those logits instead, taken in
        patch order (putting the logits in raster order cost a quarter of a training step on 32x32)."""
        patches = rearrange(codes, "b (h p) (w q) -> b (h w) (p q)", p=self.patch_size, q=self.patch_size)
        logits = self._patch_logits(patches, z)
        if return_nats_per_code:
            return nats_per_code(logits, patches)
        return rearrange(logits, "b (h w) (p q) k -> b (h p w q) k", h=self.patches_shape[0], p=self.patch_size)

    @torch.no_grad()
    def sample(self, z, temperature=1.0, top_p=1.0, guidance=1.0, use_cache=True, noise_groups=0):
        """Code grids (B, h, w) drawn code by code for slice indices z (B,). guidance w != 1:
        classifier-free guidance, each code's unconditional logits moved w times the way z moves
        them (both in one batch). top_p < 1: nucleus sampling, each code drawn from the fewest
        likeliest codes whose probabilities sum to top_p or more (keep_nucleus). Each code is
        drawn from the softmax of its logits by module.gumbel_max; `noise_groups` = G: the batch
        is G volumes one after another whose slices share that noise, so that neighbouring
        slices, whose laws are alike, draw alike codes (as the diffusion's share their noise); 0:
        independent draws. With the KV cache each patch costs one position's work; without it
        (the original's way, kept to check and time the cache against) each code costs a forward
        pass over all patches drawn before it."""
        guided = guidance != 1.0
        z_in = with_null_z(z) if guided else z      # the batch the transformer reads

        def doubled(codes):
            return torch.cat([codes, codes]) if guided else codes

        caches = [{} for _ in self.blocks]
        token = embed_z(self.z_embedding, z_in)[:, None]
        patches = z.new_zeros(len(z), 0, self.codes_per_patch)
        for position in range(self.sequence_length):
            patch = z.new_zeros(len(z), 1, self.codes_per_patch)     # codes not yet drawn are not read
            x = self._transform(token, z_in, position, caches) if use_cache else None
            for place in range(self.codes_per_patch):
                if use_cache:
                    logits = self._code_logits(x, doubled(patch))[:, -1, place]
                else:
                    logits = self._patch_logits(doubled(torch.cat([patches, patch], dim=1)), z_in)[:, -1, place]
                logits = (guide(logits, guidance) if guided else logits.float()) / temperature
                if top_p < 1:
                    logits = keep_nucleus(logits, top_p)
                patch[:, 0, place] = gumbel_max(logits, volume_noise(torch.rand, logits.shape, noise_groups,
                                                                     logits.device))
            patches = torch.cat([patches, patch], dim=1)
            token = self.code_embedding(self._place_offsets(doubled(patch))).sum(2)
        return rearrange(patches, "b (h w) (p q) -> b (h p) (w q)", h=self.patches_shape[0], p=self.patch_size)


def keep_nucleus(logits, top_p):
    """Logits (B, num_codes) with every code outside its row's nucleus set to -inf: the nucleus is
    the fewest likeliest codes whose probabilities sum to top_p or more (Holtzman et al., 2020).
    Where the law is sure (the background) it cuts the long tail of unlikely codes; where it is
    unsure (inside the brain) it keeps nearly all of them. Unlike a fixed top-k, the cut follows
    how sure each position is."""
    sorted_logits, order = logits.sort(-1, descending=True)
    probabilities = sorted_logits.softmax(-1)
    outside = probabilities.cumsum(-1) - probabilities >= top_p      # the codes before it hold top_p already
    return logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))


def prior_args(config, num_codes, grid_shape):
    """CodePrior's arguments for a config and the first stage's codes, after checking the rules
    the constants must follow (each head gets N_EMBD / N_HEAD channels)."""
    util.check_positive_ints(config, ("N_LAYER", "N_HEAD", "N_EMBD"))
    patch_size = util.checked_patch_size(config, grid_shape, "code grid")
    if config["N_EMBD"] % config["N_HEAD"]:
        raise util.UserError(f"N_EMBD must be divisible by N_HEAD (each head gets N_EMBD / N_HEAD channels), "
                             f"e.g. N_EMBD={config['N_HEAD'] * max(1, round(config['N_EMBD'] / config['N_HEAD']))} "
                             f"for N_HEAD={config['N_HEAD']}; got N_EMBD={config['N_EMBD']}")
    if not 0 <= config["DROPOUT"] < 1:
        raise util.UserError(f"DROPOUT must be in [0, 1), got {config['DROPOUT']}")
    if not config["TEMPERATURES"] or min(config["TEMPERATURES"]) <= 0:
        raise util.UserError(f"TEMPERATURES must hold temperatures above 0 (1.0 samples the learned "
                             f"distribution), got {config['TEMPERATURES']}")
    if not config["TOP_PS"] or not all(0 < p <= 1 for p in config["TOP_PS"]):
        raise util.UserError(f"TOP_PS must hold nucleus masses in (0, 1] (1 = every code), got {config['TOP_PS']}")
    util.check_guidance(config)
    return dict(num_codes=num_codes, grid_shape=tuple(grid_shape), num_z_positions=NUM_Z,
                num_layers=config["N_LAYER"], num_heads=config["N_HEAD"], dim=config["N_EMBD"],
                dropout=config["DROPOUT"], patch_size=patch_size)


def load_prior(path, device):
    """A checkpoint of train_viT.py, rebuilt for sampling: (prior in eval mode, checkpoint)."""
    checkpoint = util.load_checkpoint(path)
    prior = CodePrior(**checkpoint["model_args"])
    util.load_weights(prior, checkpoint["model"], path)
    return prior.to(device).eval(), checkpoint


def nats_per_code(logits, codes):
    """Mean cross-entropy of codes (B, ...) under logits (B, ..., num_codes) holding the codes' places
    in the same order (a code grid (B, h, w) and raster logits (B, h*w, num_codes), for one)."""
    return F.cross_entropy(logits.flatten(0, -2).float(), codes.flatten())


@torch.no_grad()
def sample_volumes(prior, first_stage, device, volumes=1, temperature=1.0, top_p=1.0, guidance=1.0):
    """`volumes` x 32 slices (z = 0..31) drawn by the prior and decoded: (volumes * 32, 1, H, W),
    each volume's slices sharing their sampling noise (CodePrior.sample's noise_groups)."""
    z = torch.arange(NUM_Z, device=device).repeat(volumes)
    return first_stage.decode_indices(prior.sample(z, temperature, top_p, guidance, noise_groups=volumes), z)
