# The prior over config/pre_train_sharp.py's 32x32 codes: 1024 per slice, ~2 min an epoch here
# (4x the default's), so fewer epochs and no sampling search (temperature 1, all codes)
FIRST_STAGE = "vqvae32"
EPOCHS = 4
TEMPERATURES = (1.0,)
TOP_KS = (0,)
