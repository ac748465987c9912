# The prior over config/pre_train_sharp.py's 32x32 codes, 2x2 codes a position: 256 positions
# as on the default's 16x16 grid, four codes predicted at each (~43 s an epoch here)
FIRST_STAGE = "vqvae32"
PATCH_SIZE = 2
