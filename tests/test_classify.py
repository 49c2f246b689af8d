"""``python -m vgg_flax.classify`` as a subprocess on scikit-learn's sample photos.

Weights: a seeded random torchvision VGG-11 at 1/4 width (hidden 64, 1x1 adaptive pool, 1000
classes), converted with ``vgg_flax.from_torch`` and written with ``vgg_flax.save``. Expected
output: torchvision's transforms + the torch model on the same files, top-5 classes in the same
order with probabilities equal to the printed precision. Budget: ~30 s (one subprocess).
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.models.vgg import VGG, make_layers

import sklearn
import vgg_flax
from vgg_flax.classify import main, top_classes

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = [Path(sklearn.__file__).parent / "datasets" / "images" / f
          for f in ("china.jpg", "flower.jpg")]
OVERRIDES = dict(width=0.25, hidden_size=64, pool_size=(1, 1))


def small_torch_vgg11() -> VGG:
    """torchvision's VGG class with configuration A at 1/4 width and a small classifier."""
    torch.manual_seed(0)
    cfg = [16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128, "M"]
    model = VGG(make_layers(cfg), num_classes=1000)
    model.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    model.classifier = nn.Sequential(nn.Linear(128, 64), nn.ReLU(True), nn.Dropout(),
                                     nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(),
                                     nn.Linear(64, 1000))
    with torch.no_grad():  # peaked posteriors, so the top-5 order is a real check
        for m in model.classifier:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.2)
                nn.init.normal_(m.bias, 0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    tv = small_torch_vgg11()
    variables = vgg_flax.from_torch(tv.state_dict(), "vgg11", **OVERRIDES)
    path = tmp_path_factory.mktemp("w") / "vgg11_quarter"
    vgg_flax.save(path, variables, "vgg11", module=vgg_flax.create("vgg11", **OVERRIDES))
    return tv, path


def torch_top5(tv, path):
    t = torchvision.models.VGG11_Weights.IMAGENET1K_V1.transforms()
    with torch.no_grad():
        p = tv(t(Image.open(path).convert("RGB"))[None]).softmax(-1)[0].numpy()
    order = np.argsort(-p, kind="stable")[:5]
    return [(int(i), float(p[i])) for i in order]


def parse(stdout: str) -> dict[str, list[tuple[int, float, str]]]:
    out, current = {}, None
    for line in stdout.splitlines():
        if not line.startswith("  "):
            current = out.setdefault(line, [])
        else:
            rank, pct, rest = line.split(maxsplit=2)
            label, index = rest.rsplit(" (", 1)
            current.append((int(index.rstrip(")")), float(pct.rstrip("%")) / 100, label))
    return out


def test_classify_subprocess_matches_torchvision(weights, tmp_path):
    tv, wpath = weights
    gray = tmp_path / "gray.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 130), dtype=np.uint8)).save(gray)
    junk = tmp_path / "notes.jpg"
    junk.write_text("not a picture")
    files = [str(PHOTOS[0]), str(junk), str(tmp_path / "missing.png"), str(tmp_path),
             str(PHOTOS[1]), str(gray)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)  # a user's plain one-device run
    r = subprocess.run([sys.executable, "-m", "vgg_flax.classify", *files, "--weights", str(wpath)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1, r.stderr                   # some files failed ...
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 3, r.stderr                    # ... one clear line each
    assert any("notes.jpg: not an image" in e for e in errors)
    assert any("missing.png: no such file" in e for e in errors)
    assert any("is a directory" in e for e in errors)
    got = parse(r.stdout)
    assert list(got) == [str(PHOTOS[0]), str(PHOTOS[1]), str(gray)]  # ... the rest classified
    categories = vgg_flax.imagenet_categories()
    for f in (PHOTOS[0], PHOTOS[1], gray):
        ref = torch_top5(tv, f)
        assert [i for i, _, _ in got[str(f)]] == [i for i, _ in ref], (f, got[str(f)], ref)
        for (i, prob, label), (_, ref_prob) in zip(got[str(f)], ref):
            assert abs(prob - ref_prob) <= 0.0051 / 100 + 1e-7   # printed to 0.01 %
            assert label == categories[i]
    assert max(p for _, p in torch_top5(tv, PHOTOS[0])) > 0.02  # far from uniform (0.001)


def test_classify_in_process_exit_codes(weights, capsys):
    _, wpath = weights
    assert main([str(PHOTOS[0]), "--weights", str(wpath), "--top", "3",
                 "--protocol", "multiscale", "--scales", "224,256"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(PHOTOS[0]) and len(lines) == 4
    assert main([str(PHOTOS[0]), "--weights", str(wpath.parent / "nope")]) == 2
    assert "not a vgg_flax checkpoint" in capsys.readouterr().err


def test_top_classes_names():
    post = np.array([0.1, 0.5, 0.2, 0.2])
    assert top_classes(post, 3, ["a", "b", "c", "d"]) == [(1, "b", 0.5), (2, "c", 0.2),
                                                          (3, "d", 0.2)]
    assert top_classes(post, 1)[0][1] == "class 1"  # no category names for a 4-class model
