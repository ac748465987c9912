# predict.py for the 32x32-latent pipeline (config/pre_train_sharp.py): make sharp
FIRST_STAGE = "vqvae32"
