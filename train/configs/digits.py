"""The demo: a quarter-width VGG-11 (BN) on scikit-learn's handwritten digits, upsampled to 32x32.

Runs in a few minutes on two CPU cores and reaches >= 97% test top-1. The scale jittering of the
paper is kept at this scale (shorter side S in [32, 38], random 32x32 crop); no flips (a mirrored
digit is another digit) and no colour shift (grey images).
"""
from train.configs.base import base


def get_config():
    c = base()
    c.model = "vgg11_bn"
    c.model_overrides.width = 0.25        # 16, 32, 64, 128 channels
    c.model_overrides.hidden_size = 128
    c.model_overrides.pool_size = (1, 1)  # 32x32 input -> 1x1 after pool5
    c.model_overrides.dropout_rate = 0.3
    c.dataset = "digits"
    c.train_split, c.eval_split = "train", "test"
    c.input.update(scale_min=32, scale_max=38, crop_size=32, resize_size=32, flip=False,
                   colour_shift=0.0, mean=(0.3,), std=(0.4,), num_threads=2, prefetch=4)
    c.batch_size = 64
    c.total_steps = 500
    c.checkpoint_every_steps = 250
    c.eval_every_steps = 100
    c.log_every_steps = 20
    c.optimizer.update(name="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4)
    c.learning_rate = 0.05
    c.schedule.update(name="cosine", warmup_steps=100)
    c.label_smoothing = 0.0
    c.mesh.data, c.mesh.model = -1, 1
    return c
