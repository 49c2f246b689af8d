"""Fine-tune VGG-16 on your own images: ROOT/train/<class>/<image> and ROOT/val/<class>/<image>.

    python convert/torch_to_flax.py vgg16 --out weights/vgg16     # torchvision ImageNet weights
    python train/train.py --config train/configs/folder.py --workdir runs/mine \
        --config.data_dir=ROOT --config.init_from=weights/vgg16
    python train/export.py --workdir runs/mine --out runs/mine_export
    python -m vgg_flax.classify my_photo.jpg --weights runs/mine_export   # prints your class names

Every layer is copied from ``init_from`` except fc8, re-initialised for the folder's class count
(a 1000-class folder keeps ImageNet's fc8 too; pass ``--config.init_from_layers`` to choose).
Without ``init_from`` the net starts from random initialisation (slow; needs many images).
Recipe: SGD momentum 0.9 at 1e-3 (fine-tuning: a tenth of the paper's 1e-2) with 100 warmup
steps and cosine decay, weight decay 5e-4, dropout 0.5, batch 32, the paper's scale jittering
(S in [256, 384]: milder than [256, 512], the pretrained net saw objects at ImageNet's scale),
random 224 crops, flips and the PCA colour shift; evaluation is torchvision's resize 256 /
centre crop 224, so ``eval_top1`` is what ``train/eval.py --protocol single`` reports.
"""
from train.configs.base import base


def get_config():
    c = base()
    c.model = "vgg16"
    c.model_overrides.dropout_rate = 0.5
    c.dataset = "folder"
    c.train_split, c.eval_split = "train", "val"
    c.input.update(train_kind="scale_jitter", scale_min=256, scale_max=384, crop_size=224,
                   resize_size=256, flip=True, colour_shift=0.1, num_threads=8, prefetch=16)
    c.batch_size = 32
    c.total_steps = 2000
    c.checkpoint_every_steps = 250
    c.eval_every_steps = 250
    c.log_every_steps = 10
    c.optimizer.update(name="sgd", momentum=0.9, nesterov=False, weight_decay=5e-4)
    c.learning_rate = 1e-3
    c.schedule.update(name="cosine", warmup_steps=100)
    c.init_from_layers = ""  # every layer whose shape fits: fc8 is re-initialised
    c.mesh.data, c.mesh.model = -1, 1
    return c
