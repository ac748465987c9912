# The transformer prior over the GPU first stage's 16x16 codes (config/pre_train_gpu.py):
#   python train_viT.py config/train_viT_gpu.py
FIRST_STAGE = "vqvae256"
PATCH_SIZE = 1                   # a code a position: the 16x16 grid is 256 positions already
N_LAYER = 8
N_HEAD = 8
N_EMBD = 256
DROPOUT = 0.1                    # 8 layers of width 256 over 1,536 demo slices
BATCH_SIZE = 64
EPOCHS = 20
LR = 6e-4
SWEEP_VOLUMES = 8                # 256 slices, more than the GPU critic's 176 features: the search ranks on Frechet too
