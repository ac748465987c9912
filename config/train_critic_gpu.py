# The brain critic at 256x256 for the GPU pipeline (config/pre_train_gpu.py):
#   python train_critic.py config/train_critic_gpu.py [--DATA_DIR=/path/to/oasis]
IMG_SIZE = 256
CHANNELS = (16, 32, 64, 64)
BATCH_SIZE = 32
EPOCHS = 12
