# predict.py for the GPU pipeline (config/pre_train_gpu.py): more volumes, the full 1000-step DDPM
#   python predict.py config/predict_gpu.py
FIRST_STAGE = "vqvae256"
VOLUMES = 8
DDPM_STEPS = 1000
