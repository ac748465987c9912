# The CPU first stage with a 32x32 latent grid at 64x64 (a code per 2x2 pixels instead of 4x4):
# reconstructions with most of real's 1-2 px texture, at ~2x the first stage's time and ~4x the
# second stage's. The whole pipeline on it: make sharp
RUN_NAME = "vqvae32"
CHANNEL_MULTS = (2,)         # one level of 64 channels: downsampling factor = PATCH_SIZE = 2
