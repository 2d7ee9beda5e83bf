"""vitpipe's model side: the Vision Transformer and everything that touches its weights."""
from vit.model import VisionTransformer, ViTConfig, create_model, list_models, model_from_config

__all__ = ["VisionTransformer", "ViTConfig", "create_model", "list_models", "model_from_config"]
