# The original repo's full-size first stage, for a GPU:
#   python pre_train.py config/pre_train_oasis_gpu.py --DATA_DIR=/path/to/oasis [--MODE=VAE]
# 256x256 slices, factor 16 (16x16 latents), 256 x 8 codebook / 16 VAE channels, ~19M-parameter
# autoencoder (the original: 17.7M), 2 / 3 res blocks per encoder / decoder level, batch 3,
# GAN from step 10,000, ~25,800 steps in all (the original ran 50 x 500 steps).
IMG_SIZE = 256
PATCH_SIZE = 1
BASE_CHANNELS = 64
CHANNEL_MULTS = (1, 1, 2, 2, 4)
ENCODER_RES_BLOCKS = 2
DECODER_RES_BLOCKS = 3
ATTENTION = True
LATENT_CHANNELS = 16
NUM_CODES = 256
CODE_DIM = 8
DISC_CHANNELS = 64
DISC_LAYERS = 3
DISC_ATTENTION = True
BATCH_SIZE = 3
EPOCHS = 8                   # 9,664 slices / batch 3 = 3,221 steps an epoch
LR = 2e-4
GAN_START_STEP = 10000
GAN_WEIGHT = 0.5
KL_CYCLE_STEPS = 500
DETAIL_WEIGHT = 0.0          # the original had no detail-energy loss
