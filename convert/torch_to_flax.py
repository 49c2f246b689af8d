"""torchvision (or SSD, or your own) VGG weights -> Flax, verified against torchvision.

    python convert/torch_to_flax.py vgg16                      # torchvision's IMAGENET1K_V1
    python convert/torch_to_flax.py vgg16 --weights my.pth --num-classes 10 --out out/mine
    python convert/torch_to_flax.py vgg16_ssd --weights vgg16_reducedfc.pth

All the work is in ``vgg_flax.convert`` (usable from Python); ``--help`` lists the options.
"""
import os
import signal
import sys


def _interrupted(signum, frame):  # Ctrl-C during the seconds of imports: nothing started yet
    os.write(2, b"interrupted: nothing was written\n")
    os._exit(130)


if __name__ == "__main__":  # the converter's own handler takes over once it runs
    signal.signal(signal.SIGINT, _interrupted)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vgg_flax.convert.cli import torch_to_flax_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(torch_to_flax_main())
