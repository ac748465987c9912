# The CPU first stage on a 16x16 latent grid at 64x64 (a code per 4x4 pixels), the CPU preset until
# the 32x32 grid replaced it: half the training time, but the sulci blur away (VQVAE test SSIM
# 0.958, sharpness 0.30 of real's; VAE 0.967). bench/first_stage_speed.py races it against MONAI.
#   python pre_train.py config/pre_train_grid16.py --RUN_NAME=vqvae16   [--MODE=VAE --RUN_NAME=vae16]
BASE_CHANNELS = 32
CHANNEL_MULTS = (1, 2)           # 2 x 2^1 = 4: a 16x16 latent grid
EPOCHS = 18
GAN_START_STEP = 1248
DETAIL_WEIGHT = 0.0              # on this grid the detail loss cost SSIM (0.958 -> 0.933): the code cannot say
                                 # where the detail goes, so the decoder's invented detail is misplaced
