"""Builds the denoiser network named by config.model.kind."""
from __future__ import annotations

from mmd_jax.models import mlp, unet

MODEL_KINDS = ("unet", "mlp")


def build_model(model_config, *, data_shape, num_classes: int):
  """A UNet for images ([H, W, C]) or an MLP for vectors ([D])."""
  kind = model_config.kind
  if kind == "unet":
    if len(data_shape) != 3:
      raise ValueError(f"model.kind='unet' needs images [H, W, C]; the data has shape "
                       f"{tuple(data_shape)}. Use model.kind='mlp' for vectors.")
    return unet.build_unet(model_config, image_shape=tuple(data_shape), num_classes=num_classes)
  if kind == "mlp":
    if len(data_shape) != 1:
      raise ValueError(f"model.kind='mlp' needs vectors [D]; the data has shape "
                       f"{tuple(data_shape)}. Use model.kind='unet' for images.")
    return mlp.build_mlp(model_config, dim=int(data_shape[0]), num_classes=num_classes)
  raise ValueError(f"Unknown model.kind {kind!r}; choose one of {MODEL_KINDS}.")
