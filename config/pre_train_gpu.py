# The fast first stage for one GPU, at the original's 256x256 and 16x16 latent grid:
#   python pre_train.py config/pre_train_gpu.py [--DATA_DIR=/path/to/oasis] [--MODE=VAE --RUN_NAME=vae256]
# The original's full-resolution res blocks (config/pre_train_oasis_gpu.py) cost ~15x the
# activation memory and most of the time; here the first level runs at 128x128 on 2x2 patches
# (PATCH_SIZE = 2), and batch 32 keeps the card busy (batch 3 leaves it idle, launch-bound).
RUN_NAME = "vqvae256"
IMG_SIZE = 256
PATCH_SIZE = 2
BASE_CHANNELS = 64
CHANNEL_MULTS = (1, 2, 2, 4)     # 2 x 2^3 = 16: a 16x16 latent grid
ENCODER_RES_BLOCKS = 2
DECODER_RES_BLOCKS = 2
ATTENTION = True
LATENT_CHANNELS = 16
NUM_CODES = 1024
CODE_DIM = 8
DISC_CHANNELS = 64
DISC_LAYERS = 3
DISC_ATTENTION = False
BATCH_SIZE = 32
EPOCHS = 30                      # demo brains: 48 steps an epoch; OASIS (9,664 slices): 302
LR = 5e-4
GAN_START_STEP = 720            # half-way on the demo brains
GAN_WEIGHT = 0.1
RANDOM_LATENTS = 32              # one random latent per image, as the original and as measured on the H200
DETAIL_WEIGHT = 0.0              # the detail-energy loss is untried at 256x256; on a 16x16 grid at 64x64 it cost SSIM
