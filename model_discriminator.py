"""The GAN part of the first stage, in one short file (after taming-transformers'
vqperceptual.py): a z-conditioned PatchGAN, its hinge loss and the adaptive generator weight."""
import torch
import torch.nn.functional as F
from torch import nn

import dataset
import util
from module import AttentionBlock, ConditionEmbedding, group_norm


class PatchDiscriminator(nn.Module):
    """pix2pix PatchGAN: 4x4 convs, `num_layers` of them stride 2, then one stride 1, GroupNorm,
    LeakyReLU 0.2, one attention block, a 4x4 conv to one logit per patch (30x30 at 256x256 with
    3 layers). The slice z-index enters every block as a per-channel bias."""

    def __init__(self, in_channels=1, base_channels=64, num_layers=3, num_z_positions=32, use_attention=True):
        super().__init__()
        widths = [base_channels * min(2 ** n, 8) for n in range(num_layers + 1)]
        strides = [2] * num_layers + [1]
        cond_dim = 4 * base_channels
        self.z_embedding = ConditionEmbedding(num_z_positions, cond_dim) if num_z_positions else None
        self.convs, self.norms, self.z_biases = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        channels = in_channels
        for n, (width, stride) in enumerate(zip(widths, strides)):
            self.convs.append(nn.Conv2d(channels, width, 4, stride=stride, padding=1))
            self.norms.append(nn.Identity() if n == 0 else group_norm(width))   # none on the first, as pix2pix
            if self.z_embedding is not None:
                self.z_biases.append(nn.Linear(cond_dim, width))
            channels = width
        self.attention = AttentionBlock(channels) if use_attention else nn.Identity()
        self.conv_out = nn.Conv2d(channels, 1, 4, stride=1, padding=1)

    def forward(self, images, z):
        cond = None if self.z_embedding is None else F.silu(self.z_embedding(z))
        h = images
        for n, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = norm(conv(h))
            if cond is not None:
                h = h + self.z_biases[n](cond)[:, :, None, None]
            h = F.leaky_relu(h, 0.2)
        return self.conv_out(self.attention(h))


def hinge_discriminator_loss(logits_real, *logits_fake):
    """The original's hinge loss: 0.25 * (relu(1 - D(x)) + sum over fakes of relu(1 + D(fake)))."""
    return 0.25 * (F.relu(1 - logits_real).mean() + sum(F.relu(1 + fake).mean() for fake in logits_fake))


def adaptive_gan_weight(rec_loss, gan_loss, last_layer_weight, max_weight=1e4):
    """||grad rec_loss|| / (||grad gan_loss|| + 1e-4) at the decoder's last layer, clamped to
    [0, max_weight] and detached: scales the GAN term to the reconstruction term's strength."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer_weight, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def build_discriminator(config):
    """The z-conditioned PatchGAN a config describes. Each of its DISC_LAYERS stride-2 convs
    halves the image and its last two 4x4 convs take a pixel each, so it needs
    IMG_SIZE >= 3 x 2^DISC_LAYERS."""
    util.check_positive_ints(config, ("DISC_CHANNELS", "DISC_LAYERS"))
    if config["IMG_SIZE"] < 3 * 2 ** config["DISC_LAYERS"]:
        raise util.UserError(f"IMG_SIZE must be at least 3 x 2^DISC_LAYERS = {3 * 2 ** config['DISC_LAYERS']} "
                             f"for the PatchGAN's {config['DISC_LAYERS']} stride-2 layers; got {config['IMG_SIZE']}: "
                             f"lower DISC_LAYERS or raise IMG_SIZE")
    return PatchDiscriminator(in_channels=1, base_channels=config["DISC_CHANNELS"], num_layers=config["DISC_LAYERS"],
                              num_z_positions=dataset.SLICES_PER_BRAIN if config["Z_CONDITIONING"] else None,
                              use_attention=config["DISC_ATTENTION"])
