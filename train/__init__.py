"""Sharded VGG training: ``python train/train.py [--config train/configs/NAME.py] [--workdir DIR]``."""
