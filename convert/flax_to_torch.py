"""A vgg_flax checkpoint -> a torch state_dict that torchvision's model loads with strict=True.

    python convert/flax_to_torch.py out/vgg16 --out vgg16.pth

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

from vgg_flax.convert.cli import flax_to_torch_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(flax_to_torch_main())
