# The VAE-GAN as `make` trains it: pre_train.py's CPU preset with MODE = "VAE" and 10 epochs
# instead of 14 (the GAN from step 672, epoch 8). Nothing in `make` decodes through the VAE, and
# its SSIM has room where `make`'s 20 minutes have little: after 10 epochs (135 s of training
# here) test SSIM 0.9768 and 1.03 of real's fine detail; after 14 (183 s) 0.9860 and 0.99.
#   python pre_train.py config/pre_train_vae.py
MODE = "VAE"
EPOCHS = 10
GAN_START_STEP = 672
