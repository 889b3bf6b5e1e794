"""Backbone rows: PiCIE's train, cluster and eval steps on the ResNet-18 FPN and on DINO's
ViT-S/8 (linear head, STEGO head, STEGO head on a frozen backbone), all timed interleaved in
one group, with parameter counts and XLA's compiled memory; and the attention memory of
ViT-S/8 at the COCO shape (res1 320: 1,600 patch tokens + CLS) against the naive
B x heads x T^2 x 4 bytes of one attention matrix per block.

Every variant is the shape's config (step_rows.SHAPES) with its model fields overridden and one
batch size for every phase; the weights are random (the cost does not depend on them).
"""

import jax
import jax.numpy as jnp

from benchmarks import step_rows
from benchmarks import timing
from picie_jax import platform
from picie_jax.models import fpn
from picie_jax.models import vit

VARIANTS = {
    "resnet18_fpn": ("model.backbone=resnet18",),
    "vit_s8_linear": ("model.backbone=vit_small_patch8", "model.head=linear"),
    "vit_s8_stego": ("model.backbone=vit_small_patch8", "model.head=stego"),
    "vit_s8_stego_frozen": (
        "model.backbone=vit_small_patch8",
        "model.head=stego",
        "model.freeze_backbone=true",
    ),
}
STEPS = ("train_step", "cluster_step", "eval_step")
BATCH_OF_STEP = {"train_step": "train", "cluster_step": "cluster", "eval_step": "eval"}
ATTENTION_DEPTHS = (1, 2)  # ViT depths compiled for the attention memory (compile only)


def variant_overrides(variant, batch, overrides=()):
  """The config overrides of one variant: its model fields, random init, `batch` for every
  phase, then the user's overrides (e.g. model.vit_depth=1, model.dtype=bfloat16)."""
  return [
      *VARIANTS[variant],
      "model.init=random",
      f"train.batch_size={batch}",
      f"kmeans.batch_size={batch}",
      f"eval.batch_size={batch}",
      *overrides,
  ]


def parameter_counts(jax_steps):
  """(all, trained) parameters of f_theta: a frozen backbone's are not trained."""
  network = jax_steps.state.params["network"]
  total = sum(x.size for x in jax.tree.leaves(network))
  if not jax_steps.config.model.freeze_backbone:
    return total, total
  return total, total - sum(x.size for x in jax.tree.leaves(network["backbone"]))


def step_functions(variant, jax_steps):
  return {f"{variant}/{step}": getattr(jax_steps, step) for step in STEPS}


def row_fields(variant, jax_steps):
  """The fields of each variant's rows besides the timing: sizes, parameters, feature map, and
  XLA's compiled memory of the rows that are one jitted call (train and eval step)."""
  config = jax_steps.config
  total, trained = parameter_counts(jax_steps)
  stride = fpn.backbone_spec(config.model.backbone).feature_stride
  calls = jax_steps.calls()
  fields = {}
  for step in STEPS:
    batch, side = jax_steps.sizes[BATCH_OF_STEP[step]]
    call = calls.get(f"picie_jax/{step}")
    fields[f"{variant}/{step}"] = {
        "batch_size": batch,
        "side": side,
        "res1": config.res1,
        "feature_side": config.res1 // stride,
        "params": total,
        "trained_params": trained,
        "memory": None if call is None else step_rows.compiled_memory(step_rows.compile_call(call)),
    }
  return fields


def _compiled_temp_bytes(fn, *args):
  memory = step_rows.compiled_memory(jax.jit(fn).lower(*args).compile())
  return None if memory is None else memory["temp_bytes"]


def attention_memory(model_config, mesh, batch, res1):
  """XLA's temp bytes for ViT attention at (batch, res1^2) against the naive formula, compiled
  from shapes only (jax.eval_shape; nothing runs): `jax.nn.dot_product_attention` alone
  (forward, and forward + backward) at float32, and the ViT of `model_config` (forward and the
  gradient of its features' sum) at ATTENTION_DEPTHS blocks, whose difference is one block."""
  arch = vit.ARCHITECTURES[model_config.backbone]
  tokens = (res1 // arch.patch_size) ** 2 + 1
  head_dim = arch.embed_dim // arch.num_heads
  qkv = jax.ShapeDtypeStruct((batch, tokens, arch.num_heads, head_dim), jnp.float32)

  def attention_sum(q, k, v):
    return jax.nn.dot_product_attention(q, k, v).sum()

  out = {
      "backbone": model_config.backbone,
      "batch_size": batch,
      "res1": res1,
      "tokens": tokens,
      "heads": arch.num_heads,
      "model_dtype": model_config.dtype,
      "naive_bytes_per_block": batch * arch.num_heads * tokens**2 * 4,
      "attention_op_forward_temp_bytes": _compiled_temp_bytes(
          jax.nn.dot_product_attention, qkv, qkv, qkv
      ),
      "attention_op_grad_temp_bytes": _compiled_temp_bytes(
          jax.grad(attention_sum, argnums=(0, 1, 2)), qkv, qkv, qkv
      ),
      "vit_temp_bytes": {},
  }
  images = jax.ShapeDtypeStruct((batch, res1, res1, 3), jnp.float32)
  for depth in ATTENTION_DEPTHS:
    cfg = model_config.copy_and_resolve_references()
    cfg.vit_depth = depth
    model = fpn.model_from_config(cfg, platform.platform_of(mesh))
    variables = jax.eval_shape(model.init, jax.random.key(0), images, train=False)

    def features_sum(variables, images, model=model):
      return model.apply(variables, images, train=True).sum()

    out["vit_temp_bytes"][str(depth)] = {
        "forward": _compiled_temp_bytes(
            lambda v, x, model=model: model.apply(v, x, train=False), variables, images
        ),
        "grad": _compiled_temp_bytes(jax.grad(features_sum), variables, images),
    }
  low, high = (out["vit_temp_bytes"][str(d)] for d in ATTENTION_DEPTHS)
  blocks = ATTENTION_DEPTHS[1] - ATTENTION_DEPTHS[0]
  out["vit_grad_temp_bytes_per_block"] = (
      None if None in (low["grad"], high["grad"]) else (high["grad"] - low["grad"]) / blocks
  )
  return out


def backbone_group(shape, variants, batch, overrides, seed, timing_settings):
  """The steps of `variants` (names in VARIANTS; empty: all) at `shape` ('demo' or 'coco' of
  step_rows.SHAPES) and `batch`, timed interleaved (timing_settings: repeats, warmup,
  max_foreign_cores, max_extra_rounds), and, with a ViT among them, the attention memory at the
  COCO shape's res1 and `batch`. Returns {'rows', 'timing', 'attention', 'configs'}; raises
  step_rows.MissingField for a config without a variant's field."""
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    raise SystemExit(
        f"--backbones-variants {','.join(unknown)}: no such variant; use {', '.join(VARIANTS)}"
    )
  jax_steps, configs = {}, {}
  for variant in variants or VARIANTS:
    variant_config = variant_overrides(variant, batch, overrides)
    jax_steps[variant] = step_rows.JaxSteps(step_rows.load_config(shape, variant_config), seed)
    configs[variant] = {"module": step_rows.SHAPES[shape]["config"], "overrides": variant_config}
  fns = {}
  for variant, steps in jax_steps.items():
    fns.update(step_functions(variant, steps))
  timed = timing.time_interleaved(fns, *timing_settings)
  rows = {}
  for variant, steps in jax_steps.items():
    for name, fields in row_fields(variant, steps).items():
      stats = timed["fns"][name]
      rows[name] = {
          **stats,
          **fields,
          "group": "backbones",
          "contaminated": timed["contaminated"],
          "images_per_s": fields["batch_size"] / stats["median_s"],
      }
  attention = None
  vits = [s for s in jax_steps.values() if s.config.model.backbone in vit.ARCHITECTURES]
  if vits:
    coco_res1 = step_rows.load_config("coco", overrides).res1
    attention = attention_memory(vits[0].config.model, vits[0].run.mesh, batch, coco_res1)
  return {"rows": rows, "timing": timed, "attention": attention, "configs": configs}
