"""torch <-> Flax conversion: every weight layout we know, verified against torchvision, safe.

Python API (the CLIs in ``convert/`` and the ``vgg-torch-to-flax``/``vgg-flax-to-torch`` console
scripts only parse arguments and call these):

- ``load_torch_weights(name, weights) -> (module, variables)``: a torch weights file (or
  torchvision's published weights) as Flax variables, in memory.
- ``torch_to_flax(name, weights, out, ...) -> Summary``: the same, written (orbax, safetensors
  or flax msgpack) atomically and verified against torchvision's model.
- ``flax_to_torch(src, out, ...) -> Summary``: a vgg_flax checkpoint back to a torch state_dict
  that torchvision's module loads with ``strict=True``.
- ``decimate_fc(fc6_w, fc6_b, fc7_w, fc7_b)``: SSD's "reduced fc" from classifier weights.

One concern a module: ``sources`` (files, torchvision's weights and hub cache), ``layouts`` (key
layouts, SSD surgery), ``mapping`` (the fit check and torch -> Flax arrays), ``formats`` (orbax,
safetensors, msgpack), ``verify`` (against torchvision), ``atomic`` (temp path, rename, Ctrl-C),
``jobs`` (the two conversions), ``cli`` (the two command lines).

Precision: weights are converted to float32 by default (fp16/bf16 sources are widened, which is
exact). ``dtype="keep"`` keeps the source's floating dtype, ``"float16"``/``"bfloat16"`` narrow.
The module's ``param_dtype`` follows, compute stays float32; BatchNorm statistics stay float32.

Memory: a ``.pth`` is memory-mapped and each tensor's pages are released once converted (large
tensors go in row blocks); the converted arrays are allocated so that jax uses them in place;
orbax writes them without its host copy; verification runs the Flax model, frees it, then
torchvision's model layer by layer from the mapped file. Measured peaks: docs/performance.md.
"""
from vgg_flax.convert.atomic import commit, interrupt_after, settle
from vgg_flax.convert.cli import flax_to_torch_main, torch_to_flax_main
from vgg_flax.convert.errors import ConversionError
from vgg_flax.convert.formats import (FORMATS, check_written, default_out, digests, flatten,
                                      format_for, read_flax, unflatten, write_flax)
from vgg_flax.convert.jobs import Summary, flax_to_torch, torch_to_flax
from vgg_flax.convert.layouts import (CLASSIFIER_LAYOUTS, ClassifierLayout, decimate_fc,
                                      detect_layout, to_library_layout)
from vgg_flax.convert.mapping import (DTYPES, Prepared, check_fit, load_torch_weights,
                                      map_to_flax, prepare, suggest_overrides)
from vgg_flax.convert.memory import empty_aligned, peak_rss_bytes, release_memory
from vgg_flax.convert.sources import (SSD_NAME, Source, build_module, default_weights,
                                      hf_source, hub_cache_file, resolve_weights,
                                      weights_enum)
from vgg_flax.convert.verify import (Verification, compare, output_names, torch_reference,
                                     verification_inputs, verify)

__all__ = [
    "CLASSIFIER_LAYOUTS", "ClassifierLayout", "ConversionError", "DTYPES", "FORMATS", "Prepared",
    "SSD_NAME", "Source", "Summary", "Verification", "build_module", "check_fit",
    "check_written", "commit", "compare", "decimate_fc", "default_out", "default_weights",
    "detect_layout", "digests", "empty_aligned", "flatten", "flax_to_torch",
    "flax_to_torch_main", "format_for", "hf_source", "hub_cache_file", "interrupt_after",
    "load_torch_weights", "map_to_flax", "output_names", "peak_rss_bytes", "prepare", "weights_enum",
    "read_flax", "release_memory", "resolve_weights", "settle", "suggest_overrides",
    "to_library_layout", "torch_reference", "torch_to_flax", "torch_to_flax_main", "unflatten",
    "verification_inputs", "verify", "write_flax",
]
