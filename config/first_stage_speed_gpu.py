# bench/first_stage_speed.py on a GPU: our GPU preset against MONAI's VQVAE of matched size
# (4 stride-2 levels to the same 16x16 grid, 64/128/256/320 channels, 2 res layers, 17.6M
# parameters; PatchDiscriminator 64 channels, 3 layers), both at 256x256, batch 32:
#   python bench/first_stage_speed.py config/first_stage_speed_gpu.py
FIRST_STAGE_PRESET = "config/pre_train_gpu.py"
CONTESTANT_NAMES = ("ours, z, 4x4 patches, CUDA graph", "MONAI, z channel, CUDA graph")   # each at its fastest
MONAI_CHANNELS = (64, 128, 256, 320)
MONAI_RES_LAYERS = 2
MONAI_DISC_CHANNELS = 64
MONAI_DISC_LAYERS = 3
MONAI_OUTPUT_ACT = None      # linear, MONAI's default: with tanh its reconstructions went all black (-1) within
                             # 15 steps at 256x256 and stayed there (test SSIM 0.634 in every run, that of a black image)
BATCH_SIZE = 32
LEARNING_RATES = (1e-4, 5e-4)   # each contestant's picked on validate (MONAI: 5e-4; ours on 4x4 patches: 1e-4)
TUNE_SECONDS = 10.0
BUDGET_SECONDS = 30.0
THREADS = 4
