# The original repo's full-size first stage, for a GPU: python pre_train.py config/pre_train_oasis_gpu.py --DATA_DIR=/path/to/oasis
# 256x256 slices, factor 16 (16x16 latents), 256 x 8 codebook, ~17.7M-parameter autoencoder,
# 2 / 3 res blocks per encoder / decoder level, GAN from step 10,000, 50 epochs x ~500 steps.
IMG_SIZE = 256
BASE_CHANNELS = 64
CHANNEL_MULTS = (1, 1, 2, 2, 4)
ENCODER_RES_BLOCKS = 2
DECODER_RES_BLOCKS = 3
LATENT_CHANNELS = 16
NUM_CODES = 256
CODE_DIM = 8
DISC_CHANNELS = 64
DISC_LAYERS = 3
BATCH_SIZE = 3
EPOCHS = 8                   # 9,664 slices / batch 3 = 3,221 steps an epoch: ~25,800 steps, the original ran 50 x 500
GAN_START_STEP = 10000
KL_CYCLE_STEPS = 500
PATCH_SIZE = 1
ATTENTION = True
