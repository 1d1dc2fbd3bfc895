"""Builds the denoiser network named by config.model.kind."""
from __future__ import annotations

MODEL_KINDS = ("unet", "mlp")


def build_model(model_config, *, data_shape, num_classes: int):
  """A UNet for images ([H, W, C]) or an MLP for vectors ([D])."""
  kind = model_config.kind
  if kind == "unet":
    from mmd_jax.models import unet
    if len(data_shape) != 3:
      raise ValueError(f"model.kind='unet' needs images [H, W, C]; the data has shape "
                       f"{tuple(data_shape)}. Use model.kind='mlp' for vectors.")
    return unet.build_unet(model_config, image_shape=tuple(data_shape), num_classes=num_classes)
  if kind == "mlp":
    from mmd_jax.models import mlp
    if len(data_shape) != 1:
      raise ValueError(f"model.kind='mlp' needs vectors [D]; the data has shape "
                       f"{tuple(data_shape)}. Use model.kind='unet' for images.")
    return mlp.build_mlp(model_config, dim=int(data_shape[0]), num_classes=num_classes)
  raise ValueError(f"Unknown model.kind {kind!r}; choose one of {MODEL_KINDS}.")


def logical_rules(model_config, mesh_config=None):
  """Logical-axis -> mesh-axis rules: the model family's defaults
  (embeddings.default_logical_rules) updated by config.mesh.rules ('name=axis,...'), as
  (name, tuple of mesh axes) pairs. An unknown logical name in config.mesh.rules is an error."""
  del model_config  # UNet and MLP share one set of logical names
  from mmd_jax.models import embeddings
  from mmd_jax.parallel import sharding
  spec = mesh_config.get("rules", "") if mesh_config is not None else ""
  return tuple(sharding.parse_rules(spec, base=embeddings.default_logical_rules()).items())
