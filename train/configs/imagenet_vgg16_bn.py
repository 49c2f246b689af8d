"""A modern recipe for VGG-16-BN on ImageNet: linear warmup then cosine decay, label smoothing 0.1,
bf16 compute with fp32 parameters, Nesterov SGD, random-resized crops and flips, 100 epochs.

    python train/train.py --config train/configs/imagenet_vgg16_bn.py --workdir runs/vgg16_bn \
        --config.manual_dir=/data/imagenet_tars --config.mesh.model=2
"""
from train.configs.base import base


def get_config():
    c = base()
    c.model = "vgg16_bn"
    c.model_overrides.dropout_rate = 0.5
    c.compute_dtype = "bfloat16"
    c.dataset = "imagenet2012"
    c.train_split, c.eval_split = "train", "validation"
    c.input.update(train_kind="random_resized_crop", crop_size=224, resize_size=256, flip=True,
                   colour_shift=0.0, num_threads=16, prefetch=32)
    c.batch_size = 1024
    steps_per_epoch = 1281167 // 1024
    c.total_steps = 100 * steps_per_epoch
    c.checkpoint_every_steps = 1000
    c.eval_every_steps = 2 * steps_per_epoch
    c.log_every_steps = 100
    c.optimizer.update(name="sgd", momentum=0.9, nesterov=True, weight_decay=5e-5)
    c.learning_rate = 0.1 * 1024 / 256     # linear scaling from 0.1 at batch 256
    c.schedule.update(name="cosine", warmup_steps=5 * steps_per_epoch)
    c.label_smoothing = 0.1
    c.mesh.data, c.mesh.model = -1, 1
    return c
