# The latent DDPM over config/pre_train_sharp.py's 32x32 latents: ~14 s an epoch here (4x the
# default's); guidance 1 never won on the 16x16 latents, so only 2 and 3 are searched
FIRST_STAGE = "vqvae32"
GUIDANCE_SCALES = (2.0, 3.0)
