"""vitpipe's model side: the Vision Transformer and everything that touches its weights."""
from vit.interop import from_timm_state_dict, to_timm_state_dict
from vit.model import VisionTransformer, ViTConfig, create_model, list_models, model_from_config
from vit.pos_embed import resample_pos_embed
from vit.surgery import prepare_for_finetune

__all__ = ["VisionTransformer", "ViTConfig", "create_model", "list_models", "model_from_config",
           "resample_pos_embed", "prepare_for_finetune", "to_timm_state_dict", "from_timm_state_dict"]
