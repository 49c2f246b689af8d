"""The paper's test protocols: scales, the 5x5x2 crop grid, dense evaluation against a torch
reference, and the batched/sharded Evaluator against a row-by-row computation.

Dense parity: full-size VGG-16 with seeded random torchvision weights; the torch reference is
torchvision's ``features`` followed by its classifier reshaped into Conv2d 512->4096 7x7,
4096->4096 1x1, 4096->1000 1x1, score map averaged. fp32, highest matmul precision, tolerance
1e-4 of the largest logit. Budget: ~60 s (two VGG-16 compiles, a few torch forwards).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import vgg_flax
from torch_ref import randomize
from vgg_flax.evaluate import (CROP, DENSE, PROTOCOLS, Evaluator, error_table, evaluate_image,
                               flip_valid, grid_offsets, multicrop, padded_shape, posterior_fns,
                               rows, single_scale, test_scales as paper_test_scales,
                               topk_correct)

RTOL = 1e-4


def assert_close(ours, ref, rtol=RTOL):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    assert err <= rtol * np.abs(ref).max(), f"max abs diff {err}, max |ref| {np.abs(ref).max()}"


# -- full-size VGG-16: one seeded torchvision model shared by the parity tests -----------------------
@pytest.fixture(scope="module")
def vgg16_pair():
    torch.manual_seed(0)
    tv = randomize(torchvision.models.vgg16().eval(), 0)  # non-zero biases: fc6-fc8 as convs too
    # torchvision's N(0, 0.01) classifier init makes logits tiny; scale fc8 so softmax is not flat
    # and flip averaging of posteriors is a real test.
    with torch.no_grad():
        tv.classifier[6].weight.mul_(50.0)
    variables = vgg_flax.from_torch(tv.state_dict(), "vgg16")
    return tv, jax.tree.map(jnp.asarray, variables)


def torch_dense(tv: torchvision.models.VGG) -> nn.Module:
    """torchvision's VGG as a fully convolutional net: the classifier's Linear layers reshaped."""
    fc6, fc7, fc8 = tv.classifier[0], tv.classifier[3], tv.classifier[6]
    convs = []
    for fc, k in ((fc6, 7), (fc7, 1), (fc8, 1)):
        c = nn.Conv2d(fc.in_features // (k * k), fc.out_features, k)
        with torch.no_grad():
            # torch flattens (C, H, W), so a Linear row viewed as (C, k, k) is an OIHW filter.
            c.weight.copy_(fc.weight.view(fc.out_features, -1, k, k))
            c.bias.copy_(fc.bias)
        convs.append(c)
    return nn.Sequential(tv.features, convs[0], nn.ReLU(), convs[1], nn.ReLU(), convs[2]).eval()


def test_dense_at_224_equals_standard_head(vgg16_pair):
    """At 224x224 pool5 is 7x7: the 7x7 fc6 convolution sees exactly the flattened map."""
    _, variables = vgg16_pair
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 224, 224, 3)), jnp.float32)
    with jax.default_matmul_precision("highest"):
        std = vgg_flax.create("vgg16").apply(variables, x)
        dense_model = vgg_flax.create("vgg16", dense=True, taps=("fc8",))
        score_map = dense_model.apply(variables, x)["fc8"]
    assert score_map.shape == (2, 1, 1, 1000)
    assert_close(score_map[:, 0, 0], std, rtol=1e-5)


def test_dense_at_larger_size_equals_torch_conv_reference(vgg16_pair):
    """250x330 (not a multiple of 32): the Evaluator's path pads it to 256x352 and masks; the
    result must still be the unpadded image's, as torch computes it."""
    tv, variables = vgg16_pair
    x = np.random.default_rng(1).standard_normal((1, 250, 330, 3)).astype(np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref_map = torch_dense(tv)(xt)                        # (1, 1000, 1, 4)
        ref_flip_map = torch_dense(tv)(torch.flip(xt, dims=[3]))
    assert tuple(ref_map.shape) == (1, 1000, 1, 4)
    ref_logits = ref_map.mean(dim=(2, 3))
    ref_post = 0.5 * (ref_logits.softmax(-1) + ref_flip_map.mean(dim=(2, 3)).softmax(-1))
    padded = np.zeros((1, *padded_shape(x.shape[1:])), np.float32)
    assert padded.shape == (1, 256, 352, 3)
    padded[:, :250, :330] = x
    valid = jnp.array([[250, 330]], jnp.int32)
    with jax.default_matmul_precision("highest"):
        logits = vgg_flax.create("vgg16", dense=True).apply(variables, jnp.asarray(x))
        post = jax.jit(posterior_fns(vgg_flax.create("vgg16"), flip=True)[DENSE])(
            variables, jnp.asarray(padded), valid)
    assert_close(logits, ref_logits.numpy())   # the model's own dense mode
    assert_close(post, ref_post.numpy())       # padded, masked, flip-averaged
    # flip averaging is not a no-op here, so the comparison above tested it
    assert np.abs(ref_post.numpy() - ref_logits.softmax(-1).numpy()).max() > 1e-4


# -- scales and crops ---------------------------------------------------------------------------
def test_paper_test_scales():
    assert paper_test_scales(256) == (224, 256, 288)
    assert paper_test_scales(384) == (352, 384, 416)
    assert paper_test_scales((256, 512)) == (256, 384, 512)
    assert single_scale(256) == 256 and single_scale((256, 512)) == 384


def coded_image(h, w):
    """Each pixel holds its own (y, x, 0), so a crop tells where it came from."""
    y, x = np.mgrid[:h, :w].astype(np.float32)
    return np.stack([y, x, np.zeros_like(y)], -1)


@pytest.mark.parametrize("hw", [(256, 341), (384, 384), (224, 300), (512, 683)])
def test_multicrop_is_a_5x5_grid_with_flips(hw):
    h, w = hw
    img = coded_image(h, w)
    crops = multicrop(img, 224)
    assert crops.shape == (50, 224, 224, 3)
    ys, xs = grid_offsets(h, 224), grid_offsets(w, 224)
    for offs, side in ((ys, h), (xs, w)):
        exact = np.arange(5) * (side - 224) / 4
        assert offs[0] == 0 and offs[-1] == side - 224            # grid spans the whole image
        assert np.all(np.abs(np.array(offs) - exact) <= 0.5)       # evenly spaced, rounded
    for k, (y, x) in enumerate((y, x) for y in ys for x in xs):
        np.testing.assert_array_equal(crops[k], img[y:y + 224, x:x + 224])
        np.testing.assert_array_equal(crops[25 + k], img[y:y + 224, x:x + 224][:, ::-1])
    if hw == (256, 341):  # spelled out once: 32/4 = 8 per step vertically, 117/4 = 29.25 across
        assert ys == [0, 8, 16, 24, 32] and xs == [0, 29, 59, 88, 117]


def test_rows_per_protocol():
    img = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    scales = (224, 256, 288)
    counts = {"single": (1, 0), "dense": (0, 1), "multiscale": (0, 3), "multicrop": (150, 0),
              "dense+multicrop": (150, 3)}
    for protocol in PROTOCOLS:
        rs = rows(img, protocol, "vgg16", scales=scales[:1] if protocol == "dense" else scales)
        n_crop = sum(r.kind == CROP for r in rs)
        n_dense = sum(r.kind == DENSE for r in rs)
        assert (n_crop, n_dense) == counts[protocol], protocol
        assert abs(sum(r.weight for r in rs) - 1) < 1e-12
        assert all(r.array.dtype == np.float32 for r in rs)
        if protocol == "dense+multicrop":  # dense and multi-crop each carry half the vote
            assert abs(sum(r.weight for r in rs if r.kind == DENSE) - 0.5) < 1e-12
    dense_shapes = [r.array.shape for r in rows(img, "multiscale", "vgg16", scales=scales)]
    assert dense_shapes == [(224, 298, 3), (256, 341, 3), (288, 384, 3)]
    with pytest.raises(ValueError, match="protocol"):
        rows(img, "tencrop")
    with pytest.raises(ValueError, match="scales"):
        rows(img, "dense")
    with pytest.raises(ValueError, match="does not fit"):
        grid_offsets(200, 224)


# -- the batched, sharded evaluator against a row-by-row computation --------------------------------
# pool_size (2, 2): dense fc6 is a 2x2 convolution, so masking its window is tested too
SMALL = dict(width=0.25, hidden_size=64, pool_size=(2, 2), num_classes=10)


def random_variables(module, seed=0, in_channels=3):
    """He-normal random variables from the module's abstract shapes (numpy: no init compile)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 64, 64, in_channels)))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if path[-1].key == "bias":
            return jnp.asarray(rng.normal(0, 0.1, s.shape), jnp.float32)
        fan_in = int(np.prod(s.shape[:-1]))
        return jnp.asarray(rng.normal(0, np.sqrt(2 / fan_in), s.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def small():
    module = vgg_flax.create("vgg11", **SMALL)
    return module, random_variables(module)


class Rowwise:
    """Independent reference: each row alone through the model, no batching, no sharding."""

    def __init__(self, module, variables, flip=True):
        dense = module.clone(dense=True)
        self.flip = flip
        self.crop_f = jax.jit(lambda x: jax.nn.softmax(module.apply(variables, x)))
        self.dense_f = jax.jit(lambda x: jax.nn.softmax(dense.apply(variables, x)))

    def __call__(self, image_rows):
        total = 0.0
        for r in image_rows:
            x = jnp.asarray(r.array[None])
            if r.kind == CROP:
                p = self.crop_f(x)
            else:
                p = self.dense_f(x)
                if self.flip:
                    p = 0.5 * (p + self.dense_f(x[:, :, ::-1]))
            total = total + r.weight * np.asarray(p[0], np.float64)
        return total


def test_evaluator_matches_rowwise_on_8_devices(small):
    module, variables = small
    assert jax.device_count() == 8
    rng = np.random.default_rng(2)
    # two images share a shape (so share batches), one is portrait; none is a multiple of 32
    images = [rng.integers(0, 256, hw, dtype=np.uint8)
              for hw in [(60, 100, 3), (60, 100, 3), (111, 67, 3)]]
    pre = dict(resize_size=72, crop_size=64, mean=(0.485, 0.456, 0.406),
               std=(0.229, 0.224, 0.225), interpolation="bilinear")
    # batch 12 -> 16 (a multiple of 8 devices); max_pending small so early flushes happen
    ev = Evaluator(module, variables, batch_size=12, max_pending=40)
    reference = Rowwise(module, variables)
    for protocol, scales in [("single", None), ("multiscale", (64, 75)),
                             ("dense+multicrop", (64, 75))]:
        items = [(i, rows(im, protocol, pre, scales)) for i, im in enumerate(images)]
        got = dict(ev(items))
        assert sorted(got) == list(range(len(images)))
        for i, image_rows in items:
            np.testing.assert_allclose(got[i], reference(image_rows), rtol=2e-5, atol=1e-6,
                                       err_msg=protocol)
            assert abs(got[i].sum() - 1) < 1e-5
    # dense rows were padded: (64, 106) and (75, 125) -> (64, 128), (96, 128)
    assert {k for k in ev._compiled if k[0] == DENSE} == {
        (DENSE, (64, 128, 3)), (DENSE, (96, 128, 3)), (DENSE, (128, 64, 3)),
        (DENSE, (128, 96, 3))}
    assert ev.batch_size == 16 and ev.calls > 1


def test_evaluate_image_and_errors(small):
    module, variables = small
    img = np.random.default_rng(3).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    pre = dict(resize_size=72, crop_size=64, mean=(0.5,) * 3, std=(0.25,) * 3)
    post = evaluate_image(img, module, variables, "multicrop", pre, scales=(64, 70))
    ref = Rowwise(module, variables)(rows(img, "multicrop", pre, (64, 70)))
    np.testing.assert_allclose(post, ref, rtol=2e-5, atol=1e-6)
    with pytest.raises(ValueError, match="classifier"):
        posterior_fns(vgg_flax.create("vgg16_ssd"))
    with pytest.raises(ValueError, match="given twice"):
        list(Evaluator(module, variables, batch_size=8)(
            [(0, rows(img, "single", pre)), (0, rows(img, "single", pre))]))


def test_flip_valid_mirrors_only_the_image():
    x = np.zeros((2, 2, 6, 1), np.float32)
    x[0, :, :4, 0] = [1, 2, 3, 4]
    x[1, :, :6, 0] = [1, 2, 3, 4, 5, 6]
    out = np.asarray(flip_valid(jnp.asarray(x), jnp.array([[2, 4], [2, 6]])))
    np.testing.assert_array_equal(out[0, 0, :, 0], [4, 3, 2, 1, 0, 0])
    np.testing.assert_array_equal(out[1, 1, :, 0], [6, 5, 4, 3, 2, 1])


def test_topk_correct_and_table():
    rng = np.random.default_rng(4)
    post = rng.random((200, 30))
    labels = rng.integers(0, 30, 200)
    post[:50, 10:] = 0.0  # ties (as from underflow) must not count as hits
    order = np.argsort(-post, axis=1, kind="stable")
    for k in (1, 5):
        brute = sum(labels[i] in order[i, :k] for i in range(200))
        assert topk_correct(post, labels, (1, 5))[k] == brute
    assert topk_correct(np.zeros((1, 10)), np.array([7]))[5] == 0
    table = error_table([dict(model="vgg16", protocol="dense", train_scale="256",
                              test_scales="256", images=10, top1_error=28.123, top5_error=9.37)])
    assert "| vgg16 | dense | 256 | 256 | 10 | 28.1 | 9.4 |" in table


# -- train/eval.py end to end on tfds.testing.mock_data ---------------------------------------------
def _eval_cli():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "train" / "eval.py"
    spec = importlib.util.spec_from_file_location("vgg_flax_eval_cli", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def mock_imagenet(tmp_path_factory):
    """A small ImageNet-shaped model whose fc8 bias fixes its top-5 to classes chosen from the
    mock labels, so the expected errors are known exactly; saved as a checkpoint."""
    import tensorflow_datasets as tfds  # a missing dependency fails, never skips
    with tfds.testing.mock_data(num_examples=6):
        labels = [int(tfds.data_source("imagenet2012", split="validation")[i]["label"])
                  for i in range(6)]
    module = vgg_flax.create("vgg11", **dict(SMALL, num_classes=1000))
    variables = random_variables(module, seed=5)
    top = [labels[0]] + [l for l in labels if l != labels[0]][:1]
    top += [c for c in range(1000) if c not in labels][:5 - len(top)]
    bias = np.zeros(1000, np.float32)
    bias[top] = 30.0 - 5.0 * np.arange(5)  # margins far above what the damped features move
    variables["params"]["fc8"]["bias"] = jnp.asarray(bias)
    variables["params"]["fc8"]["kernel"] = variables["params"]["fc8"]["kernel"] * 1e-3
    path = vgg_flax.save(tmp_path_factory.mktemp("ckpt") / "vgg11_small", variables, "vgg11",
                         module=module)
    expect = {"top1": 100 * (1 - sum(l == top[0] for l in labels) / 6),
              "top5": 100 * (1 - sum(l in top for l in labels) / 6)}
    return path, expect, module, variables


SMALL_ARGS = ["--crop-size", "64", "--resize-size", "72", "--batch-size", "12"]


@pytest.mark.parametrize("protocol", ["single", "dense+multicrop"])
def test_eval_cli_end_to_end_on_mock_data(mock_imagenet, protocol, capsys):
    import tensorflow_datasets as tfds
    path, expect, _, _ = mock_imagenet
    cli = _eval_cli()
    with tfds.testing.mock_data(num_examples=6):
        result = cli.main(["--weights", str(path), "--dataset", "imagenet2012",
                           "--protocol", protocol, "--scales", "64", *SMALL_ARGS])
    out = capsys.readouterr().out
    assert result["images"] == 6 and result["devices"] == 8
    assert result["top1_error"] == pytest.approx(expect["top1"])
    assert result["top5_error"] == pytest.approx(expect["top5"])
    row = f"| {protocol} | " + ("- | 72/64 crop" if protocol == "single" else "256 | 64")
    assert row in out, out
    assert f"| 6 | {expect['top1']:.1f} | {expect['top5']:.1f} |" in out, out
    assert "top-1 val. error (%)" in out and "images/s" in out


def test_each_process_reads_only_its_share(mock_imagenet):
    import tensorflow_datasets as tfds
    from vgg_flax.evaluate import evaluate_source, host_share
    _, expect, module, variables = mock_imagenet
    assert [list(host_share(7, i, 3)) for i in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]

    class Counting:
        def __init__(self, src):
            self.src, self.read = src, []

        def __len__(self):
            return len(self.src)

        def __getitem__(self, i):
            self.read.append(i)
            return self.src[i]

    pre = dict(resize_size=72, crop_size=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    correct1 = 0
    with tfds.testing.mock_data(num_examples=6):
        for pi in range(2):
            src = Counting(tfds.data_source("imagenet2012", split="validation"))
            r = evaluate_source(src, module, variables, "single", pre, batch_size=8,
                                process_index=pi, process_count=2, progress=False)
            assert sorted(src.read) == list(range(pi, 6, 2))
            assert r["local_images"] == 3
            correct1 += round(3 * (1 - r["top1_error"] / 100))
    assert correct1 == round(6 * (1 - expect["top1"] / 100))


def test_eval_cli_errors(tmp_path, mock_imagenet):
    cli = _eval_cli()
    with pytest.raises(SystemExit, match="not a vgg_flax checkpoint"):
        cli.main(["--weights", str(tmp_path), "--dataset", "imagenet2012"])
    with pytest.raises(SystemExit, match="cannot open TFDS dataset 'mnist'.*tfds build mnist"):
        cli.open_dataset("mnist", "test", str(tmp_path))
    path = mock_imagenet[0]
    with pytest.raises(SystemExit, match="smaller than the 224-pixel crop"):
        cli.main(["--weights", str(path), "--synthetic", "40x50", "--protocol", "dense",
                  "--scales", "64", "--limit", "1"])


_TWO_PROCESS_EVAL = r"""
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
import numpy as np
import vgg_flax
from vgg_flax.evaluate import evaluate_source
module, variables = vgg_flax.load(sys.argv[3])
labels = json.loads(sys.argv[4])
source = [{"image": np.random.default_rng(i).integers(0, 256, (40, 40, 3), np.uint8), "label": l}
          for i, l in enumerate(labels)]
pre = dict(resize_size=36, crop_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
r = evaluate_source(source, module, variables, "single", pre, batch_size=4, threads=1,
                    progress=False)
print("RESULT " + json.dumps({k: r[k] for k in ("images", "local_images", "top1_error",
                                                "top5_error")}))
"""


def test_counts_are_summed_across_two_processes(tmp_path):
    """evaluate_source in 2 real processes (jax.distributed over gloo): each scores only its
    share, and the all-gathered counts give every process the errors of one process reading
    everything (allreduce_counts' cross-process branch)."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path
    from vgg_flax.evaluate import evaluate_source
    module = vgg_flax.create("vgg11", num_classes=10, width=0.125, hidden_size=16, pool_size=(1, 1))
    variables = random_variables(module, seed=2)
    # fc8's bias makes class 3 first and 7 second for every image, so the counts are not trivial
    bias = np.zeros(10, np.float32)
    bias[[3, 7]] = [30.0, 20.0]
    variables["params"]["fc8"]["bias"] = jnp.asarray(bias)
    path = vgg_flax.save(tmp_path / "ckpt", variables, "vgg11", module=module)
    labels = [3, 3, 1, 7, 2, 5, 3]  # top-1 right on 3 of 7 by construction
    source = [{"image": np.random.default_rng(i).integers(0, 256, (40, 40, 3), np.uint8),
               "label": l} for i, l in enumerate(labels)]
    pre = dict(resize_size=36, crop_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    one = evaluate_source(source, *vgg_flax.load(path), "single", pre, batch_size=4, threads=1,
                          process_index=0, process_count=1, progress=False)
    assert one["images"] == 7 and one["top1_error"] == pytest.approx(100 * 4 / 7)
    assert one["top5_error"] <= 100 * 5 / 7  # classes 3 and 7 are in every top-5

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_EVAL, f"localhost:{port}",
                               str(i), str(path), json.dumps(labels)],
                              env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    results = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:]))
    assert [r["local_images"] for r in results] == [4, 3]  # each scored only its share
    for r in results:
        assert r["images"] == 7
        assert r["top1_error"] == pytest.approx(one["top1_error"])
        assert r["top5_error"] == pytest.approx(one["top5_error"])
