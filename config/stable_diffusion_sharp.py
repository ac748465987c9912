# The latent DDPM over config/pre_train_sharp.py's 32x32 latents, folded 2x2 into channels: the
# default's U-Net on a 16x16 grid (~5 s an epoch here; unfolded, 32x32 took ~14 s), plus its small
# head at 32x32 (HEAD_CHANNELS) that keeps the samples on the codebook
FIRST_STAGE = "vqvae32"
PATCH_SIZE = 2
