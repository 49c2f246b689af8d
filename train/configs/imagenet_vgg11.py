"""The paper's net A (VGG-11) with the same recipe as imagenet_vgg16.py. The paper trained A from
random initialisation and used it to initialise the deeper nets:

    python train/train.py --config train/configs/imagenet_vgg11.py --workdir runs/vgg11 \
        --config.manual_dir=/data/imagenet_tars
    python train/export.py --workdir runs/vgg11 --out runs/vgg11_export
    python train/train.py --config train/configs/imagenet_vgg16.py --workdir runs/vgg16 \
        --config.manual_dir=/data/imagenet_tars \
        --config.init_from=runs/vgg11_export --config.init_from_layers=paper
"""
from train.configs import imagenet_vgg16


def get_config():
    c = imagenet_vgg16.get_config()
    c.model = "vgg11"
    return c
