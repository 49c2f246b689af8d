"""torch <-> Flax conversion: every weight layout we know, verified against torchvision, safe.

Python API, all that this package exports (the CLIs in ``convert/`` and the
``vgg-torch-to-flax``/``vgg-flax-to-torch`` console scripts, ``vgg_flax.convert.cli``, only parse
arguments and call these). Weights already in memory go through ``vgg_flax.from_torch`` /
``vgg_flax.to_torch``; published weights through ``vgg_flax.pretrained``.

- ``torch_to_flax(name, weights, out, ...) -> Summary``: a torch weights file (or torchvision's
  published weights) as Flax variables, written (orbax, safetensors or flax msgpack) atomically
  and verified against torchvision's model.
- ``flax_to_torch(src, out, ...) -> Summary``: a vgg_flax checkpoint back to a torch state_dict
  that torchvision's module loads with ``strict=True``.
- ``decimate_fc(fc6_w, fc6_b, fc7_w, fc7_b)``: SSD's "reduced fc" from classifier weights.
- ``Summary``: what a conversion did; ``ConversionError`` (a ``vgg_flax.WeightsError``): bad
  input, one line with the fix.

Internals, one concern a module, imported from there (``vgg_flax.convert.sources``...), not
from this package: ``sources`` (files, torchvision's weights and hub cache), ``layouts`` (key
layouts, SSD surgery), ``mapping`` (the fit check and torch -> Flax arrays), ``formats`` (orbax,
safetensors, msgpack), ``verify`` (against torchvision), ``atomic`` (temp path, rename, Ctrl-C),
``jobs`` (the two conversions), ``cli`` (the two command lines), ``memory`` (peak RSS,
releasing pages).

Precision: weights are converted to float32 by default (fp16/bf16 sources are widened, which is
exact). ``dtype="keep"`` keeps the source's floating dtype, ``"float16"``/``"bfloat16"`` narrow.
The module's ``param_dtype`` follows, compute stays float32; BatchNorm statistics stay float32.

Memory: a ``.pth`` is memory-mapped and each tensor's pages are released once converted (large
tensors go in row blocks); the converted arrays are allocated so that jax uses them in place;
orbax writes them without its host copy; verification runs the Flax model, frees it, then
torchvision's model layer by layer from the mapped file. Measured peaks: docs/performance.md.
"""
from vgg_flax.convert.jobs import Summary, flax_to_torch, torch_to_flax
from vgg_flax.convert.layouts import decimate_fc
from vgg_flax.errors import ConversionError

__all__ = ["ConversionError", "Summary", "decimate_fc", "flax_to_torch", "torch_to_flax"]
