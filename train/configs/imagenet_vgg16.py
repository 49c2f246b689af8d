"""The paper's recipe for VGG-16 (D) on ImageNet (Simonyan & Zisserman, section 3.1).

Batch 256, SGD momentum 0.9, weight decay 5e-4, dropout 0.5 on fc6/fc7, learning rate 1e-2 divided
by 10 when validation accuracy stops improving (the paper: 3 times, 370K iterations / 74 epochs),
scale jittering S in [256, 512] with random 224x224 crops, horizontal flips, RGB colour shift.
The paper initialised deeper nets from a trained net A: train imagenet_vgg11.py, export it, then
``--config.init_from=EXPORTED_VGG11 --config.init_from_layers=paper``.

    python train/train.py --config train/configs/imagenet_vgg16.py --workdir runs/vgg16 \
        --config.manual_dir=/data/imagenet_tars
"""
from train.configs.base import base


def get_config():
    c = base()
    c.model = "vgg16"
    c.model_overrides.dropout_rate = 0.5
    c.dataset = "imagenet2012"
    c.train_split, c.eval_split = "train", "validation"
    c.input.update(train_kind="scale_jitter", scale_min=256, scale_max=512, crop_size=224,
                   resize_size=256, flip=True, colour_shift=0.1, num_threads=16, prefetch=32)
    c.batch_size = 256
    steps_per_epoch = 1281167 // 256
    c.total_steps = 74 * steps_per_epoch
    c.checkpoint_every_steps = 2000
    c.eval_every_steps = steps_per_epoch
    c.log_every_steps = 100
    c.optimizer.update(name="sgd", momentum=0.9, nesterov=False, weight_decay=5e-4)
    c.learning_rate = 1e-2
    c.schedule.update(name="plateau", plateau_factor=0.1, plateau_patience=2)
    c.mesh.data, c.mesh.model = -1, 1
    return c
