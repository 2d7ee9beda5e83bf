"""Self-describing model files: ``model.safetensors`` + ``model_config.json``, and one loader
for every weight format we accept (run folder, timm ``.pth``/``.pt``/``.safetensors``, Google ``.npz``).

All I/O goes through ``shards.storage`` so a local directory and an ``s3://`` prefix behave alike.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
from typing import Any, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shards import storage
from vit.interop import CheckpointError, adapt_model, from_timm_state_dict, load_big_vision_npz, load_state_dict_strict
from vit.model import VisionTransformer, model_from_config

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "model_config.json"


def save_model(model: VisionTransformer, dir_url: str | os.PathLike) -> str:
    """Write ``model.safetensors`` then ``model_config.json`` (last: the config marks the pair
    complete) under ``dir_url`` (local dir or ``s3://`` prefix). Returns ``dir_url``."""
    dir_url = str(dir_url)
    raw = getattr(model, "module", model)  # DDP/DeepSpeed wrappers hold the model in .module
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in raw.state_dict().items()}
    cfg_url = storage.join(dir_url, CONFIG)
    if storage.exists(cfg_url):  # overwriting: a crash below must not leave an old config on new weights
        storage.delete(cfg_url)
    storage.write_bytes(storage.join(dir_url, WEIGHTS), st_save(tensors, metadata={"format": "pt"}))
    storage.write_json(cfg_url, raw.config)
    return dir_url


def _unwrap(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside a torch checkpoint ({'state_dict': ...}, {'model': ...}, or bare)."""
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{source}: no state dict of tensors inside (top-level type {type(obj).__name__})")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _torch_load(source: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(io.BytesIO(storage.read_bytes(source)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        first = next((ln for ln in lines if "global" in ln.lower()), lines[0])
        raise CheckpointError(f"{source}: refused to unpickle: the file holds more than tensors (it could run "
                         f"code on load: {first[:160]}); convert it to .safetensors where it was made") from None
    return _unwrap(obj, source)


def load_model(source: str | os.PathLike, *, img_size: int | tuple[int, int] | None = None,
               num_classes: int | None = None, mode: str = "bicubic", name: str | None = None,
               **overrides: Any) -> VisionTransformer:
    """Load a model strictly from ``source``:

    - a directory / ``s3://`` prefix (e.g. a run folder) with ``model_config.json`` + ``model.safetensors``;
    - a timm state dict ``.pth`` / ``.pt`` (``torch.load(weights_only=True)``) or ``.safetensors``
      (architecture from shapes; ``name=`` gives num_heads / pool when not inferable);
    - a Google ``.npz`` (google-research/vision_transformer or big_vision layout).

    ``img_size`` different from the checkpoint's resamples the position embeddings (``mode``),
    ``num_classes`` different installs a new zero head; both are logged.
    """
    source = str(source)
    lower = source.lower()
    if lower.endswith(".npz"):
        return load_big_vision_npz(source, name, img_size=img_size, num_classes=num_classes,
                                   mode=mode, **overrides)
    if lower.endswith((".pth", ".pt", ".bin")):
        return from_timm_state_dict(_torch_load(source), name, img_size=img_size, num_classes=num_classes,
                                    mode=mode, source=source, **overrides)
    if lower.endswith(".safetensors"):
        sd = st_load(storage.read_bytes(source))
        return from_timm_state_dict(sd, name, img_size=img_size, num_classes=num_classes,
                                    mode=mode, source=source, **overrides)
    cfg_url, w_url = storage.join(source, CONFIG), storage.join(source, WEIGHTS)
    if not storage.exists(cfg_url):
        raise CheckpointError(
            f"{source}: no {CONFIG} there; expected a run folder / directory written by "
            f"vit.checkpoint.save_model, or a .pth/.pt/.safetensors/.npz file")
    if not storage.exists(w_url):
        raise CheckpointError(f"{source}: {CONFIG} is there but {WEIGHTS} is missing")
    if name is not None or overrides:
        raise CheckpointError(f"{source}: a saved model carries its own config; name=/overrides are not used "
                         "(use img_size=/num_classes= to adapt it)")
    try:
        cfg = storage.read_json(cfg_url)
        with torch.device("meta"):
            model = model_from_config(cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_url}: bad model config: {e}") from None
    model = model.to_empty(device="cpu")
    load_state_dict_strict(model, st_load(storage.read_bytes(w_url)), source=w_url)
    return adapt_model(model, img_size=img_size, num_classes=num_classes, mode=mode)
