"""convert/torch_to_flax.py as a process: Ctrl-C at any moment ends it with one line and status
130 and leaves nothing behind; a conversion prints no warning of our dependencies.

Python's KeyboardInterrupt could land in one of JAX's garbage-collection callbacks, be printed
there and swallowed: the conversion went on, wrote its output and exited 0 (issue 26). A small
VGG-11, three processes at once. Budget: ~15 s on 2 shared cores (mostly their imports).
"""
import signal
import subprocess
import time

import torch

from test_convert import SMALL, SMALL_FLAGS, T2F, _env, seeded_state_dict
from test_train_cli import assert_quiet


def test_ctrl_c_at_any_moment_leaves_nothing(tmp_path):
    weights = tmp_path / "small.pth"
    torch.save(seeded_state_dict("vgg11", **SMALL), weights)
    procs = {}
    for case in ("uninterrupted", "importing", "writing"):
        (tmp_path / case).mkdir()
        cmd = T2F + ["vgg11", "--weights", str(weights), *SMALL_FLAGS, "--out",
                     str(tmp_path / case / "v")]
        procs[case] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, env=_env())
    time.sleep(1.0)  # the imports take seconds
    procs["importing"].send_signal(signal.SIGINT)
    deadline = time.time() + 300
    while time.time() < deadline and procs["writing"].poll() is None:
        if any(".v.tmp-" in p.name for p in (tmp_path / "writing").iterdir()):  # staged output
            procs["writing"].send_signal(signal.SIGINT)
            break
        time.sleep(0.005)
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = [l for l in err.splitlines() if l.strip() and "%|" not in l]  # no progress bars
        if case == "uninterrupted":
            assert proc.returncode == 0, err[-3000:]
            assert (tmp_path / case / "v" / "vgg_flax.json").is_file()
            assert_quiet(err)
            continue
        assert proc.returncode == 130, (case, proc.returncode, err[-3000:])
        assert lines == ["interrupted: nothing was written"], (case, err[-3000:])
        assert list((tmp_path / case).iterdir()) == [], case
