# The latent DDPM over the GPU first stage's 16x16 latents (config/pre_train_gpu.py):
#   python stable_diffusion.py config/stable_diffusion_gpu.py
FIRST_STAGE = "vqvae256"
PATCH_SIZE = 1                   # the 16x16 grid unfolded
BASE_CHANNELS = 64
CHANNEL_MULTS = (1, 2, 2)
RES_BLOCKS = 2
BATCH_SIZE = 64
EPOCHS = 100
LR = 5e-4
EVAL_EVERY = 5                   # validate + checkpoint every 5th epoch: each is ~0.5 s beside a ~1.1-s epoch
SWEEP_VOLUMES = 8                # 256 slices, more than the GPU critic's 176 features: the search ranks on Frechet too
