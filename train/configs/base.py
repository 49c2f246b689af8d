"""Every key the trainer reads, with its default. Configs start from ``base()`` and override."""
import ml_collections

from train.sharding import DEFAULT_RULES
from vgg_flax.registry import IMAGENET_MEAN, IMAGENET_STD


# The command-line type of each VGG field (ml_collections parses --config.KEY=VALUE by it;
# vgg_flax.fields.validate_fields then checks the value). Sequences are tuples, dtypes and
# precisions their names ("bfloat16", "highest"); cfg and precision take any Python literal.
_FIELD_TYPES = {"cfg": object, "precision": object, "pool_size": tuple, "taps": tuple,
                "dtype": str, "param_dtype": str}


def model_fields() -> ml_collections.ConfigDict:
    """A ConfigDict with every field of ``vgg_flax.VGG``, each None (unset), typed."""
    import dataclasses

    from vgg_flax import VGG
    out = ml_collections.ConfigDict()
    for f in dataclasses.fields(VGG):
        if f.name in ("parent", "name"):
            continue
        kind = _FIELD_TYPES.get(f.name) or type(f.default)  # bool, int, float, str
        out[f.name] = ml_collections.FieldReference(None, field_type=kind)
    return out


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "vgg16"                  # any vgg_flax.list_models() name with the "fc" head
    # Every field of vgg_flax.VGG (width, hidden_size, conv, param_dtype, ...), None = the
    # model's default: --config.model_overrides.FIELD=VALUE works on every config.
    c.model_overrides = model_fields()
    c.compute_dtype = "float32"        # "bfloat16": bf16 activations/matmuls, fp32 parameters

    c.dataset = "imagenet2012"         # "digits", "folder" (data_dir=ROOT/<split>/<class>/<image>) or TFDS
    c.train_split, c.eval_split = "train", "validation"
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.manual_dir = ml_collections.FieldReference(None, field_type=str)
    c.download = True                  # try tfds download_and_prepare when not prepared
    c.input = ml_collections.ConfigDict(dict(
        image_key="image", label_key="label",
        train_kind="scale_jitter",     # or "random_resized_crop"
        scale_min=256, scale_max=512,  # scale jittering: shorter side S ~ U[scale_min, scale_max]
        crop_size=224, resize_size=256,  # eval: shorter side -> resize_size, centre crop
        flip=True, colour_shift=0.1,   # AlexNet-style RGB shift std (0 = off)
        draft=False,                   # folder JPEGs: decode at 1/2-1/8 size when still >= the
                                       # largest scale needed (fast on big photos, not bit-exact)
        mean=IMAGENET_MEAN, std=IMAGENET_STD,  # in 0..1 units
        num_threads=2, prefetch=8))

    c.batch_size = 256                 # global, over all processes and devices
    c.eval_batch_size = ml_collections.FieldReference(None, field_type=int)  # None: batch_size
    c.grad_accum_steps = 1             # micro-batches per step (batch_size is the total)
    c.total_steps = 1000
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.eval_every_steps = 500
    c.log_every_steps = 50
    c.seed = 0
    # Resuming DIR under a config whose meaning differs from DIR/train_config.json (model, data,
    # batch, optimizer, schedule, seed...) is refused unless this is True; cadence keys
    # (total_steps, *_every_steps, keep_checkpoints) and placement (mesh, threads) may change.
    c.allow_config_change = False

    c.optimizer = ml_collections.ConfigDict(dict(
        name="sgd", momentum=0.9, nesterov=False, b1=0.9, b2=0.999, eps=1e-8,
        weight_decay=5e-4,             # coupled L2 on kernels only (biases and BN not decayed)
        grad_clip_norm=0.0))           # 0 = no clipping
    c.learning_rate = 0.01
    c.schedule = ml_collections.ConfigDict(dict(
        name="constant",               # "constant", "cosine" (after warmup) or "plateau"
        warmup_steps=0,
        plateau_factor=0.1, plateau_patience=2, plateau_cooldown=0, plateau_rtol=1e-4))
    c.label_smoothing = 0.0

    c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
    c.sharding = ml_collections.ConfigDict(dict(rules=DEFAULT_RULES, fsdp=False,
                                                fsdp_min_size=2 ** 16))

    # XLA's compiled programs on disk (train/compile_cache.py): None = $JAX_COMPILATION_CACHE_DIR
    # if set, else $VGG_FLAX_CACHE/xla if set, else DIR/xla_cache; a directory; "" or "off".
    c.compile_cache = ml_collections.FieldReference(None, field_type=str)

    c.init_from = ml_collections.FieldReference(None, field_type=str)  # vgg_flax.save dir
    # Layers copied from init_from: "" = every parameter whose name and shape match (a changed
    # num_classes re-initialises fc8); "paper" = the paper's init of a deeper net from vgg11
    # (conv1_1, conv2_1, conv3_1, conv3_2, fc6, fc7, fc8); or comma-separated layer names.
    c.init_from_layers = ""
    return c
