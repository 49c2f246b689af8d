"""Every command in the README's code blocks runs as written (issue 26): each ```bash command
(``\\`` continuations joined, ``&&`` chains split) and each ```python block, as a subprocess whose
working directory behaves as the repo root, offline, on small data.

README.md is parsed when the tests are collected. Every command has one recipe in ``RECIPES``,
keyed by its text (a python block by its first line): what the workspace must hold first
(``GIVEN``), what stands in for a download, which documented flags make a long run short, what
it must print. A command without a recipe fails with a line saying to add one. One test per
block; the blocks of a section share a workspace, and a block that uses what the one above it
wrote runs after it (Deploying's python block runs the files its bash block exported).

A workspace is a temporary directory with symlinks to the repo's ``convert/``, ``train/``,
``vgg_flax/`` and to the files of ``benchmarks/`` (its ``results/`` is the workspace's own), so
relative paths work as in the README and nothing is written into the repo. A command runs in a
user's environment: ``python`` is this interpreter, no PYTHONPATH into the repo, one CPU device,
the workspace's own empty caches (``TORCH_HOME``, ``VGG_FLAX_CACHE``, ``HF_HOME``, TFDS' data
dir), ``HF_HUB_OFFLINE=1`` and a proxy that refuses every connection: a download fails at once.

Python blocks continue the text around them: a recipe's preamble defines what a block takes
from it (``images``, ``x``, ...) and its postamble asserts what the block computed; the script
run is written to the workspace as ``readme_block_L<line>.py``.

Full size only where nothing smaller can stand in: the ssd.pytorch file (the converter verifies
only the standard SSD300 backbone), the library block's ``VGG16`` init, and
``vgg_flax.pretrained`` (its cache holds seeded full-size vgg16, vgg16_ssd and vgg19: it refuses
other shapes). Every other model is a 1/8-width vgg16 whose checkpoint records its fields
(``vgg_flax.json``), so the commands that read ``out/vgg16`` or a trained run take it as written;
where a command makes one from torchvision's layout, the converter gets its ``--set`` flags. The
full-size default-weights round trip is tests/test_convert.py's.

The README's two install lines are what CI runs (``.ci/run``): their set-up and test command are
checked against it as text, not run here. The part after the install, ``python train/train.py``,
is the digits demo (before issue 26, tests/test_train_demo.py), run once for both places the
README shows it. Budget, measured on 2 shared cores: ~3.7 min, 45 s of it the demo; beyond the
demo ~150 s of CPU, a third of it the imports of JAX, torch and TensorFlow in 24 processes.
"""
from __future__ import annotations

import json
import os
import re
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"

# The shape of every small "vgg16" here, as vgg_flax.create, the converter's --set and the
# trainer's model_overrides spell it (every config declares every VGG field).
SMALL = dict(width=0.125, hidden_size=64)
SMALL_SET = ("--set", "width=0.125", "--set", "hidden_size=64")
SMALL_TRAIN = ("--config.model_overrides.width=0.125", "--config.model_overrides.hidden_size=64")
# Two steps of batch 2, evaluated and checkpointed at the end, one input thread.
SHORT_TRAIN = ("--config.total_steps=2", "--config.batch_size=2", "--config.eval_batch_size=2",
               "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2",
               "--config.log_every_steps=1", "--config.input.num_threads=1",
               "--config.input.prefetch=2")
MOCK_EXAMPLES = 2  # images per split of tfds.testing.mock_data


# ---- the README, parsed ------------------------------------------------------------------------

FENCE = re.compile(r"^```([\w+-]*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
NOT_COMMANDS = ("text", "")  # fences that show output or tables
SHELL_SYNTAX = re.compile(r"\|\||[|;<>`$]|&(?!&)")


@dataclass(frozen=True)
class Block:
    line: int      # the opening fence's line in README.md
    section: str   # the "## " heading above it ("top" before the first)
    lang: str
    text: str

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-") + "-" + self.lang


def readme_blocks(text: str) -> list[Block]:
    out = []
    for m in FENCE.finditer(text):
        before = text[:m.start()]
        headings = re.findall(r"^## (.+)$", before, re.M)
        out.append(Block(before.count("\n") + 1, headings[-1] if headings else "top",
                         m.group(1), m.group(2)))
    return out


def _quoting(line: str):
    """(index, char, quoted) for each character of a shell line; quote marks count as quoted."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
            yield i, c, True
        else:
            quote = c if c in "'\"" else None
            yield i, c, quote is not None


def bash_commands(text: str) -> list[str]:
    """A bash block's commands: continuations joined, comments dropped, ``&&`` chains split,
    whitespace collapsed. Other shell syntax (pipes, redirections, ``;``, variables) is refused:
    the commands run without a shell."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        code = line
        for i, c, quoted in _quoting(line):
            if c == "#" and not quoted and (i == 0 or line[i - 1].isspace()):
                code = line[:i]
                break
        cuts = [i for i, c, quoted in _quoting(code) if not quoted and code.startswith("&&", i)]
        for start, end in zip([0] + [i + 2 for i in cuts], cuts + [len(code)]):
            command = " ".join(code[start:end].split())
            if not command:
                continue
            bare = "".join(c for _, c, quoted in _quoting(command) if not quoted)
            if SHELL_SYNTAX.search(bare):
                raise ValueError(f"`{command}`: shell syntax the README test does not run "
                                 "(only commands chained with &&)")
            commands.append(command)
    return commands


def python_key(text: str) -> str:
    """A python block's recipe key: its first line of code."""
    first = next(l for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#"))
    return "```python " + " ".join(first.split("#")[0].split())


def block_commands(block: Block) -> list[str]:
    return bash_commands(block.text) if block.lang == "bash" else [python_key(block.text)]


BLOCKS = [b for b in readme_blocks(README.read_text()) if b.lang not in NOT_COMMANDS]
# test ids: section and language, numbered where a section has several of one language
_SLUGS = [b.slug for b in BLOCKS]
IDS = [s + (f"-{_SLUGS[:i].count(s) + 1}" if _SLUGS.count(s) > 1 else "")
       for i, s in enumerate(_SLUGS)]


# ---- inputs: weights, images, datasets -----------------------------------------------------------

def random_variables(module, seed: int) -> dict:
    """Seeded numpy variables for ``module`` (no init compiled): He-normal kernels, biases and
    BatchNorm means in +-0.05, unit BatchNorm scales and variances, SSD's L2Norm scale 20."""
    import jax
    from vgg_flax.model import abstract_variables
    rng = np.random.default_rng(seed)

    def draw(path, s):
        leaf, layer = path[-1].key, path[-2].key
        if leaf == "kernel":
            return (rng.standard_normal(s.shape, np.float32)
                    * np.float32(np.sqrt(2 / np.prod(s.shape[:-1]))))
        if leaf in ("scale", "var"):
            return np.full(s.shape, 20.0 if "norm" in layer else 1.0, np.float32)
        return rng.uniform(-0.05, 0.05, s.shape).astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, abstract_variables(module))


def save_vgg(path: Path, name: str, seed: int, **fields) -> None:
    import vgg_flax
    module = vgg_flax.create(name, **fields)
    vgg_flax.save(path, random_variables(module, seed), name, module=module)


def torch_vgg16_file(path: Path, **fields) -> None:
    """A vgg16 state_dict in torchvision's layout, seeded random (``fields``: other shapes)."""
    import torch
    import vgg_flax
    module = vgg_flax.create("vgg16", **fields)
    torch.save(vgg_flax.to_torch(random_variables(module, seed=1), module), path)


def ssd_pytorch_reducedfc(path: Path) -> None:
    """ssd.pytorch's ``vgg16_reducedfc.pth``: its ``vgg(base['300'], 3)`` list (keys 0..33),
    built from torch layers as its ssd.py builds it, seeded."""
    import torch
    from torch import nn
    torch.manual_seed(0)
    layers, c = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512, "M", 512, 512, 512):
        if v in ("M", "C"):
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=v == "C"))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
            c = v
    layers += [nn.MaxPool2d(3, 1, 1), nn.Conv2d(512, 1024, 3, padding=6, dilation=6),
               nn.ReLU(inplace=True), nn.Conv2d(1024, 1024, 1), nn.ReLU(inplace=True)]
    torch.save(nn.ModuleList(layers).state_dict(), path)


def image(path: Path, seed: int, size=(40, 48)) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), np.uint8)).save(path)


def photos(ws: Path) -> None:
    """photos/{train,val}/{cats,dogs}/: 3 + 1 40x48 images per class, JPEG and PNG."""
    for split, n in (("train", 3), ("val", 1)):
        for k, cls in enumerate(("cats", "dogs")):
            for i in range(n):
                image(ws / "photos" / split / cls / f"{i}.{'png' if i == 2 else 'jpg'}",
                      seed=100 * k + 10 * i + (split == "val"))


# Python imports sitecustomize from PYTHONPATH at start-up: a process whose environment names a
# count runs under TFDS's own mock of every dataset (random images of 5..50 pixels a side).
MOCK_SITE = '''"""tests/test_readme.py: tfds.testing.mock_data for the whole process."""
import os
if os.environ.get("README_TEST_MOCK_TFDS"):
    import tensorflow_datasets as tfds
    MOCK = tfds.testing.mock_data(num_examples=int(os.environ["README_TEST_MOCK_TFDS"]))
    MOCK.__enter__()  # never left (a context no longer referenced would be closed)
'''


def mock_tfds(ws: Path) -> dict[str, str]:
    site = ws / ".readme_test_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(MOCK_SITE)
    return {"PYTHONPATH": str(site), "README_TEST_MOCK_TFDS": str(MOCK_EXAMPLES)}


# What a recipe may ask the workspace to hold: name -> maker(runner, ws), which may return
# environment variables for the command. Large files are made once and linked.
GIVEN: dict[str, Callable[["Runner", Path], Mapping[str, str] | None]] = {
    # seeded 1/8-width vgg16 weights under torchvision IMAGENET1K_V1's file name
    "hub: small vgg16": lambda r, ws: r.link(
        ws, ".cache/torch/hub/checkpoints/vgg16-397923af.pth", "vgg16_small.pth",
        lambda p: torch_vgg16_file(p, **SMALL)),
    # a 1/8-width vgg16 with a 10-class head, torchvision's layout
    "my.pth": lambda r, ws: torch_vgg16_file(ws / "my.pth", num_classes=10, **SMALL),
    "vgg16_reducedfc.pth": lambda r, ws: r.link(ws, "vgg16_reducedfc.pth",
                                                "vgg16_reducedfc.pth", ssd_pytorch_reducedfc),
    # a 1/8-width vgg16 with ImageNet's 1000 classes
    "out/vgg16": lambda r, ws: r.link(ws, "out/vgg16", "out_vgg16_small",
                                      lambda p: save_vgg(p, "vgg16", 2, **SMALL)),
    "photos": lambda r, ws: photos(ws),
    "photo.jpg": lambda r, ws: image(ws / "photo.jpg", 7),
    "my.jpg": lambda r, ws: image(ws / "my.jpg", 8),
    "imagenet2012": lambda r, ws: mock_tfds(ws),
    # an empty directory for ImageNet's archives (the mock never reads them)
    "/data/imagenet_tars": lambda r, ws: (ws / "data/imagenet_tars").mkdir(parents=True,
                                                                          exist_ok=True),
    # vgg_flax's cache: what `convert/torch_to_flax.py NAME --out DIR` writes, seeded full size
    "cache: vgg16": lambda r, ws: r.link(ws, ".cache/vgg_flax/vgg16.IMAGENET1K_V1", "cache_vgg16",
                                         lambda p: save_vgg(p, "vgg16", 3)),
    "cache: vgg16_ssd": lambda r, ws: r.link(
        ws, ".cache/vgg_flax/vgg16_ssd.IMAGENET1K_FEATURES", "cache_vgg16_ssd",
        lambda p: save_vgg(p, "vgg16_ssd", 4)),
    "cache: vgg19": lambda r, ws: r.link(ws, ".cache/vgg_flax/vgg19.IMAGENET1K_V1", "cache_vgg19",
                                         lambda p: save_vgg(p, "vgg19", 5)),
}


# ---- checks of what a command printed and left behind --------------------------------------------

def saved(rel: str, **want):
    """The vgg_flax.save directory ``rel`` exists and its vgg_flax.json has ``want``."""
    def check(ws: Path, out: str) -> None:
        from vgg_flax.checkpoint import read_info
        info = read_info(ws / rel)
        got = {k: info.get("overrides", {}).get(k, info.get(k)) for k in want}
        assert got == want, (rel, info)
    return check


def torchvision_loads_strictly(ws: Path, out: str) -> None:
    """vgg16.pth holds torchvision vgg16's keys, in its order, and torchvision's VGG class with
    the 1/8-width features and head loads it with strict=True."""
    import torch
    import torchvision
    import vgg_flax
    from vgg_flax.convert.verify import torch_reference
    state_dict = torch.load(ws / "vgg16.pth", weights_only=True)
    with torch.device("meta"):
        assert list(state_dict) == list(torchvision.models.vgg16().state_dict())
    model = torch_reference("vgg16", vgg_flax.create("vgg16", **SMALL))
    assert isinstance(model, torchvision.models.VGG)
    model.load_state_dict(state_dict, strict=True, assign=True)


def digits_demo(ws: Path, out: str) -> None:
    """The demo's promise: >= 97% test top-1 in 500 steps, a progress bar with loss, img/s and
    an ETA, five evaluations, metrics.jsonl and curves.png in its run directory."""
    final = [l for l in out.splitlines() if l.startswith("final:")]
    assert len(final) == 1, out[-2000:]
    top1 = float(re.search(r"test top-1 ([\d.]+)%", final[0]).group(1)) / 100
    print(f"digits demo: {final[0]}")
    assert top1 >= 0.97
    assert re.search(r"\d+/500 \[[\d:]+<[\d:]+", out) and "img_s=" in out and "loss=" in out
    assert len(re.findall(r"step \d+: eval top-1", out)) == 5
    run, = (ws / "runs").glob("digits-*")  # the default workdir, runs/digits-<time>
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_top1" in r]
    assert evals[-1]["step"] == 500 and abs(evals[-1]["eval_top1"] - top1) < 1e-4
    assert (run / "curves.png").exists()


def top_classes(count: int, names: set[str] | None = None):
    """classify's ranked lines: ``count`` of them, each naming one of ``names`` (None: ImageNet's
    categories)."""
    def check(ws: Path, out: str) -> None:
        from vgg_flax import registry
        ranked = re.findall(r"^\s+\d\.\s+[\d.]+%\s+(.+) \(\d+\)$", out, re.M)
        allowed = names or set(registry.imagenet_categories())
        assert len(ranked) == count and set(ranked) <= allowed, out
    return check


def bench_results(ws: Path, out: str) -> None:
    """Every row of both frameworks is there, the user's row (plain jax.jit) for each, and the
    library tuned the allocator itself in this ordinary process."""
    result = json.loads((ws / "benchmarks/results/bench.json").read_text())
    rows = result["rows"]
    seen = {(r["framework"], r["mode"], r["dtype"]) for r in rows}
    assert seen == {(f, m, d) for f in ("torchvision", "vgg_flax") for m in ("infer", "train")
                    for d in ("fp32", "bf16")}, seen
    for r in rows:
        assert r["img_s"] > 0 and r["gflop_s"] > 0 and r["ratio_vs_torch_best"] > 0, r
        assert 0 < r["frac_of_peak"]  # against a peak measured in the same rounds
    assert [r["config"] for r in rows if r["framework"] == "vgg_flax"] == [
        "vgg_flax (plain jax.jit)"] * 4
    assert "| vgg16 | train | bf16 | 1 | vgg_flax (plain jax.jit) |" in (
        ws / "benchmarks/results/bench.md").read_text()
    assert result["machine"]["host_malloc"].startswith("tuned ("), result["machine"]


# ---- recipes -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    why: str                                     # what stands in, and why
    given: tuple[str, ...] = ()                  # GIVEN names, made before it runs
    replace: Mapping[str, str] = field(default_factory=dict)  # argument as written -> stand-in
    append: tuple[str, ...] = ()                 # documented flags that make it small or short
    expect: tuple[str, ...] = ()                 # regexes its output (stdout + stderr) matches
    check: Callable[[Path, str], None] | None = None  # on the workspace and output afterwards
    exit: int = 0
    mode: str = "run"      # "run"; "ci": checked against .ci/run; "demo": the digits demo, once
    preamble: str = ""     # python blocks: what the block takes from the text around it
    postamble: str = ""    # python blocks: asserts what it computed
    after_previous: bool = False  # runs on what the section's previous block wrote


CI_SETUP = Recipe("the README's set-up: .ci/run's install() runs these lines (compared as "
                  "text), not run here", mode="ci")
CI_TEST = Recipe("the README's test command: .ci/run runs it (compared as text), and this test "
                 "is part of that run", mode="ci")
DEMO = Recipe("as written: the digits demo, 500 steps on scikit-learn's digits, run once for "
              "both places the README shows it", mode="demo", check=digits_demo)

RECIPES: dict[str, Recipe] = {
    # -- top: the install lines --------------------------------------------------------------
    "python3 -m venv .venv": CI_SETUP,
    ". .venv/bin/activate": CI_SETUP,
    'pip install -e ".[all]"': CI_SETUP,
    "python train/train.py": DEMO,
    "python -m pytest -q -n 2 --dist loadfile --max-worker-restart 0": CI_TEST,

    # -- The library -------------------------------------------------------------------------
    "```python import jax, jax.numpy as jnp, vgg_flax": Recipe(
        "as written (full-size VGG16 init at 224, jitted); the preamble makes `images` (two 32x32), "
        "`key`, and `variables_bn` (VGG16_BN's shapes, no init run)", preamble="""
import jax, jax.numpy as jnp, numpy as np, vgg_flax
images = jnp.asarray(np.random.default_rng(0).uniform(-2, 2, (2, 32, 32, 3)), jnp.float32)
key = jax.random.key(1)
variables_bn = jax.tree.map(lambda s: jnp.full(s.shape, 0.01, s.dtype),
                            jax.eval_shape(vgg_flax.VGG16_BN().init, key, images))
""", postamble="""
assert variables["params"]["fc8"]["kernel"].shape == (4096, 10)
assert logits.shape == (2, 1000) and bool(jnp.isfinite(logits).all())
assert set(updates) == {"batch_stats"}
print("library block: OK")
""", expect=("library block: OK",)),

    # -- Pretrained weights ------------------------------------------------------------------
    '```python module, variables = vgg_flax.pretrained("vgg16")': Recipe(
        "as written, from vgg_flax's cache; the preamble imports vgg_flax",
        given=("cache: vgg16", "cache: vgg16_ssd"), preamble="import vgg_flax", postamble="""
assert module.head == "ssd" and variables["params"]["conv7"]["kernel"].shape == (1, 1, 1024, 1024)
print("pretrained block: OK")
""", expect=("pretrained block: OK", r"fc8.*re-?initiali[sz]ed")),

    # -- Converting weights ------------------------------------------------------------------
    "python convert/torch_to_flax.py vgg16": Recipe(
        "torchvision's default weights from torch's hub cache, a 1/8-width vgg16 there: its "
        "shape flags appended (full size: test_convert's default-weights round trip)",
        given=("hub: small vgg16",), append=SMALL_SET,
        expect=(r"VGG16_Weights\.IMAGENET1K_V1", r"-> out/vgg16 \(orbax", r": OK"),
        check=saved("out/vgg16", name="vgg16", width=0.125)),
    "python convert/torch_to_flax.py vgg16 --weights my.pth --num-classes 10 "
    "--out out/mine": Recipe(
        "my.pth is a 1/8-width vgg16: its shape flags appended", given=("my.pth",),
        append=SMALL_SET, expect=(r"-> out/mine \(orbax", r": OK"),
        check=saved("out/mine", num_classes=10)),
    "python convert/torch_to_flax.py vgg16_ssd --weights vgg16_reducedfc.pth": Recipe(
        "as written, on a full-size ssd.pytorch file; verified on one image",
        given=("vgg16_reducedfc.pth",), append=("--verify-batch", "1"),
        expect=(r"20,484,416 parameters", r"-> out/vgg16_ssd \(orbax", r": OK")),
    "python convert/flax_to_torch.py out/vgg16 --out vgg16.pth": Recipe(
        "as written, on the 1/8-width out/vgg16 of the first line: vgg16.pth has torchvision "
        "vgg16's keys and loads strictly into torchvision's VGG of its shapes",
        expect=(r"-> vgg16\.pth", r": OK"), check=torchvision_loads_strictly),

    # -- Training ----------------------------------------------------------------------------
    "python train/train.py --config train/configs/imagenet_vgg16.py --workdir runs/vgg16 "
    "--config.manual_dir=/data/imagenet_tars": Recipe(
        "ImageNet cannot be downloaded: the paper's recipe on tfds.testing.mock_data's "
        "imagenet2012 (its archives directory an empty one), 2 steps of batch 2, 1/8 width",
        given=("imagenet2012", "/data/imagenet_tars"),
        replace={"--config.manual_dir=/data/imagenet_tars":
                 "--config.manual_dir=data/imagenet_tars"},
        append=SMALL_TRAIN + SHORT_TRAIN,
        expect=(r"vgg_flax train: vgg16 on imagenet2012", r"final: step 2, validation top-1"),
        check=lambda ws, out: (ws / "runs/vgg16/checkpoints/2").is_dir() or pytest.fail(out)),
    "python train/export.py --workdir runs/vgg16 --out runs/vgg16_export": Recipe(
        "as written, on the run above", expect=(r"exported vgg16 step 2 \(.* 1000 classes\)",),
        check=saved("runs/vgg16_export", name="vgg16", width=0.125)),

    # -- Fine-tuning on your own images --------------------------------------------------------
    "python convert/torch_to_flax.py vgg16 --out weights/vgg16": Recipe(
        "torchvision's default weights from torch's hub cache, a 1/8-width vgg16 there: its "
        "shape flags appended", given=("hub: small vgg16",), append=SMALL_SET,
        expect=(r"VGG16_Weights\.IMAGENET1K_V1", r"-> weights/vgg16 \(orbax", r": OK")),
    "python train/train.py --config train/configs/folder.py --workdir runs/mine "
    "--config.data_dir=photos --config.init_from=weights/vgg16": Recipe(
        "the folder recipe on photos/ (2 classes, 6 + 2 images), 2 steps of batch 2, the model "
        "at weights/vgg16's 1/8 width", given=("photos",), append=SMALL_TRAIN + SHORT_TRAIN,
        expect=(r"vgg_flax train: vgg16 on folder", r"final: step 2, val top-1 .* \(2 images\)")),
    "python train/export.py --workdir runs/mine --out runs/mine_export": Recipe(
        "as written", expect=(r"exported vgg16 step 2 \(.* 2 classes\)",)),
    "python -m vgg_flax.classify my.jpg --weights runs/mine_export": Recipe(
        "as written, on a 40x48 my.jpg: the folder's class names", given=("my.jpg",),
        check=top_classes(2, {"cats", "dogs"})),

    # -- Fine-tuning in NNX -------------------------------------------------------------------
    "```python import jax, optax, vgg_flax, vgg_flax.nnx": Recipe(
        "as written: three steps, then the Linen round trip through save/load in the stand-in "
        "root; the postamble checks the losses printed and that the loaded model holds the "
        "trained weights", postamble="""
import numpy as np
assert isinstance(model, vgg_flax.nnx.VGG)
np.testing.assert_array_equal(np.asarray(model.fc8.kernel.get_value()),
                              np.asarray(variables["params"]["fc8"]["kernel"]))
print("nnx block: OK")
""", expect=(r"(?m)^0 \d+\.\d+", r"(?m)^2 \d+\.\d+", "nnx block: OK")),

    # -- Evaluation --------------------------------------------------------------------------
    "python -m vgg_flax.classify photo.jpg --weights out/vgg16": Recipe(
        "as written (out/vgg16 at 1/8 width, a 40x48 photo.jpg): five ImageNet categories",
        given=("out/vgg16", "photo.jpg"), check=top_classes(5)),
    "python train/eval.py --weights out/vgg16 --dataset imagenet2012 --protocol multiscale": Recipe(
        "out/vgg16 at 1/8 width, imagenet2012 tfds.testing.mock_data's; batches of 2 (each "
        "network call is padded to --batch-size: 32 computes 16x the rows)",
        given=("out/vgg16", "imagenet2012"), append=("--batch-size", "2"),
        expect=(rf"\| multiscale \| 256 \| 224,256,288 \| {MOCK_EXAMPLES} \|",)),

    # -- Deploying ---------------------------------------------------------------------------
    "python -m vgg_flax.export out/vgg16 --out vgg16.stablehlo": Recipe(
        "as written, out/vgg16 at 1/8 width", given=("out/vgg16",),
        expect=(r": OK", r"-> vgg16\.stablehlo \(stablehlo, input batchx224x224x3")),
    "python -m vgg_flax.export out/vgg16 --out vgg16.onnx": Recipe(
        "as written, out/vgg16 at 1/8 width", given=("out/vgg16",),
        expect=(r": OK", r"-> vgg16\.onnx \(onnx, input batchx224x224x3")),
    "```python import jax, numpy as np, onnxruntime as ort": Recipe(
        "as written, on the two files the bash block above wrote", after_previous=True,
        postamble="""
assert logits.shape == (2, 1000) and np.isfinite(logits).all()
np.testing.assert_allclose(logits, np.asarray(exported.call(images)), rtol=1e-4, atol=1e-4)
print("deploy block: OK")
""", expect=("deploy block: OK",)),

    # -- Perceptual losses -------------------------------------------------------------------
    "```python from vgg_flax import lpips, losses": Recipe(
        "as written (the vgg16 trunk from vgg_flax's cache); the preamble makes `x`, `y` (two "
        "32x32 float pairs in [-1, 1])", given=("cache: vgg16",),
        preamble="""
import numpy as np
x, y = (np.random.default_rng(s).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32) for s in (0, 1))
""", postamble="""
assert d.shape == (2,) and maps.shape == (2, 32, 32) and bool((d > 0).all())
print("lpips block: OK")
""", expect=("lpips block: OK",)),
    '```python module, variables = vgg_flax.pretrained("vgg19", include_top=False, '
    'taps=losses.TAPS)': Recipe(
        "as written (vgg19 from vgg_flax's cache); the preamble imports what the blocks above "
        "import and makes `content`, `style`, `x` (32x32 in [0, 1]) and `lr`",
        given=("cache: vgg19",), preamble="""
import jax, jax.numpy as jnp, numpy as np, vgg_flax
from vgg_flax import losses
content, style, x = (jnp.asarray(np.random.default_rng(s).uniform(0, 1, (1, 32, 32, 3)),
                                 jnp.float32) for s in range(3))
lr = 1e-3
x0 = x
""", postamble="""
assert x.shape == (1, 32, 32, 3) and bool(jnp.isfinite(x).all()) and bool((x != x0).any())
print("style block: OK")
""", expect=("style block: OK",)),

    # -- Performance -------------------------------------------------------------------------
    "python benchmarks/bench.py --batch 8 32 --reps 3 --warmup 1": Recipe(
        "its smallest run (later flags win): batch 1, one round, no warm-up, 1/8 width at "
        "32x32, every mode and dtype (this is the benchmark's smoke test); it writes "
        "benchmarks/results/bench.{json,md}, as the comment says",
        append=("--batch", "1", "--reps", "1", "--warmup", "0", "--width", "0.125",
                "--size", "32", "32", "--peak-size", "256"),
        check=bench_results),
}


# ---- .ci/run -----------------------------------------------------------------------------------

def ci_function(text: str, name: str) -> str:
    """The body of the shell function ``name() { ... }`` in .ci/run."""
    m = re.search(rf"^{name}\(\) {{.*?\n(.*?)^}}", text, re.S | re.M)
    assert m, f".ci/run has no function {name}()"
    return m.group(1)


REPORT_ONLY = {"--durations=10", "-rs"}  # flags CI adds to the test command: more report only


def check_against_ci(block: Block) -> None:
    """The README's set-up lines are .ci/run's install() with its arguments put in (the README's
    python3 and venv directory), and its test command is .ci/run's run_pytest in that venv,
    plus report-only flags."""
    ci = CI.read_text()
    commands = block_commands(block)
    setup = [shlex.split(c) for c in commands if RECIPES[c] is CI_SETUP]
    python, venv = setup[0][0], setup[0][-1]  # python3 -m venv .venv
    body = [[a.replace("$1", python).replace("$2", venv) for a in shlex.split(line)]
            for line in ci_function(ci, "install").splitlines()]
    for argv in setup:
        assert argv in body, f"README `{shlex.join(argv)}` is not in .ci/run's install(): {body}"
    ci_venvs = re.findall(rf"^install {re.escape(python)} (\S+)$", ci, re.M)
    assert ci_venvs, f".ci/run never runs `install {python} DIR`"
    for command in (c for c in commands if RECIPES[c] is CI_TEST):
        argv = shlex.split(command)
        assert argv[:3] == ["python", "-m", "pytest"], command
        assert 'python -m pytest "$@"' in ci_function(ci, "run_pytest"), \
            ".ci/run's run_pytest no longer runs `python -m pytest ARGS`"
        runs = [shlex.split(l.split("||")[0])[2:] for l in ci.splitlines()
                if l.startswith(f"run_pytest {ci_venvs[0]} ")]
        assert runs, f".ci/run never runs the tests in {ci_venvs[0]}"
        n = len(argv) - 3
        assert runs[0][:n] == argv[3:] and set(runs[0][n:]) <= REPORT_ONLY, (
            f"README `{command}` is not what .ci/run runs: run_pytest {ci_venvs[0]} "
            f"{shlex.join(runs[0])}")


# ---- running -----------------------------------------------------------------------------------

@dataclass
class Ran:
    argv: list[str]
    code: int
    out: str
    seconds: float
    cpu: float


class Runner:
    """The module's workspaces (one per README section), the large inputs made once, and which
    blocks passed."""

    def __init__(self, tmp_path_factory):
        self.tmp = tmp_path_factory
        self.shared = tmp_path_factory.mktemp("readme_shared")
        self.workspaces: dict[str, Path] = {}
        self.passed: dict[int, bool] = {}   # block line -> it passed
        self.demo: tuple[Path, Ran] | None = None

    def link(self, ws: Path, rel: str, name: str, make: Callable[[Path], None]) -> None:
        """``ws/rel`` -> ``name`` in the shared directory, made by ``make`` the first time."""
        target = self.shared / name
        if not target.exists():
            make(target)
        dst = ws / rel
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(target)

    def workspace(self, section: str) -> Path:
        if section not in self.workspaces:
            ws = self.tmp.mktemp("readme_ws")
            for d in ("convert", "train", "vgg_flax"):
                (ws / d).symlink_to(ROOT / d)
            (ws / "benchmarks" / "results").mkdir(parents=True)
            for p in (ROOT / "benchmarks").iterdir():
                if p.name not in ("results", "__pycache__"):
                    (ws / "benchmarks" / p.name).symlink_to(p)
            self.workspaces[section] = ws
        return self.workspaces[section]

    @staticmethod
    def env(ws: Path, extra: Mapping[str, str]) -> dict[str, str]:
        """A user's shell after ``. .venv/bin/activate``: offline, the workspace's own caches."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "XLA_FLAGS", "VGG_FLAX_MALLOC", "README_TEST_MOCK_TFDS")
               and not k.lower().endswith("_proxy")}
        cache = ws / ".cache"
        refuse = "http://127.0.0.1:9"  # the discard port: nothing listens, connecting fails
        env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                   JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TORCH_HOME=str(cache / "torch"),
                   VGG_FLAX_CACHE=str(cache / "vgg_flax"), HF_HOME=str(cache / "huggingface"),
                   TFDS_DATA_DIR=str(cache / "tensorflow_datasets"),
                   MPLCONFIGDIR=str(cache / "matplotlib"), http_proxy=refuse,
                   https_proxy=refuse, HTTP_PROXY=refuse, HTTPS_PROXY=refuse,
                   no_proxy="localhost,127.0.0.1", NO_PROXY="localhost,127.0.0.1")
        env.update(extra)
        return env

    @staticmethod
    def run(ws: Path, argv: list[str], env: Mapping[str, str]) -> Ran:
        if argv[0] in ("python", "python3"):
            argv = [sys.executable, *argv[1:]]
        before, t = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
        p = subprocess.run(argv, cwd=ws, env=env, capture_output=True, text=True, timeout=900)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        ran = Ran(argv, p.returncode, p.stdout + p.stderr, time.time() - t, cpu)
        print(f"{ran.seconds:6.1f} s wall {ran.cpu:6.1f} s cpu  {shlex.join(argv[1:])}")
        return ran

    def execute(self, block: Block) -> None:
        commands = block_commands(block)
        missing = [c for c in commands if c not in RECIPES]
        assert not missing, "\n".join(
            f"README line {block.line}: no recipe for `{c}`: add one to RECIPES in "
            "tests/test_readme.py (what it needs, what stands in for a download, what it prints)"
            for c in missing)
        if any(RECIPES[c].after_previous for c in commands):
            earlier = [b for b in BLOCKS if b.section == block.section and b.line < block.line][-1]
            if earlier.line not in self.passed:
                try:
                    self.execute(earlier)
                except Exception:
                    self.passed[earlier.line] = False
            if not self.passed[earlier.line]:
                pytest.fail(f"the block at README line {earlier.line} failed; this one runs on "
                            "what it wrote")
        self.passed[block.line] = False
        ws = self.workspace(block.section)
        if any(RECIPES[c].mode == "ci" for c in commands):
            check_against_ci(block)
        for command in commands:
            recipe = RECIPES[command]
            if recipe.mode == "ci":
                continue
            extra: dict[str, str] = {}
            for name in recipe.given:
                extra.update(GIVEN[name](self, ws) or {})
            if recipe.mode == "demo":
                if self.demo is None:
                    self.demo = ws, self.run(ws, shlex.split(command), self.env(ws, extra))
                where, ran = self.demo
                assert ran.code == 0, ran.out[-3000:]
                recipe.check(where, ran.out)
                continue
            if block.lang == "python":
                script = ws / f"readme_block_L{block.line}.py"
                script.write_text(f"# preamble (tests/test_readme.py)\n{recipe.preamble.strip()}"
                                  f"\n\n# README.md line {block.line}\n{block.text}\n"
                                  f"# postamble\n{recipe.postamble.strip()}\n")
                argv = ["python", script.name]
            else:
                argv = shlex.split(command)
                assert set(recipe.replace) <= set(argv), (command, recipe.replace)
                argv = [recipe.replace.get(a, a) for a in argv] + list(recipe.append)
            ran = self.run(ws, argv, self.env(ws, extra))
            assert ran.code == recipe.exit, (
                f"README line {block.line}: `{command}` exited {ran.code}, not {recipe.exit}; "
                f"ran `{shlex.join(ran.argv)}` in {ws}\n{ran.out[-4000:]}")
            for pattern in recipe.expect:
                assert re.search(pattern, ran.out), (
                    f"README line {block.line}: `{command}` did not print /{pattern}/:\n"
                    f"{ran.out[-3000:]}")
            if recipe.check:
                recipe.check(ws, ran.out)
        self.passed[block.line] = True


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    r = Runner(tmp_path_factory)
    yield r
    if all(r.passed.values()):  # ~3 GB of weights; a failed block's workspace stays to look at
        import shutil
        for d in [r.shared, *r.workspaces.values()]:
            shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("block", BLOCKS, ids=IDS)
def test_readme_block(block, runner):
    runner.execute(block)


def test_every_recipe_is_a_readme_command():
    """A recipe whose command left the README is stale (the new text needs it)."""
    commands = {c for b in BLOCKS for c in block_commands(b)}
    assert not set(RECIPES) - commands, sorted(set(RECIPES) - commands)
    for recipe in RECIPES.values():
        assert set(recipe.given) <= set(GIVEN), recipe.given


def test_commands_split_as_a_shell_splits_them():
    text = ('python a.py x \\\n    --y=1   # comment "quoted"\n'
            'python b.py --s "a && b # c" && python -m c 2\n\n# only a comment\n')
    assert bash_commands(text) == ["python a.py x --y=1", 'python b.py --s "a && b # c"',
                                   "python -m c 2"]
    for bad in ("python a.py | tee log", "python a.py > out", "cd x; python a.py",
                "python a.py $HOME", "python a.py &"):
        with pytest.raises(ValueError, match="shell syntax"):
            bash_commands(bad)
