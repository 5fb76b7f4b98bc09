from .checkpoint import CheckpointError, create_timm_encoder, export_timm, load_pretrained, timm_model_kwargs
from .flops import mae_forward_flops, mae_recompute_flops, mae_recompute_pct, mae_train_flops
from .mae import Block, MAEOutput, MaskedAutoencoderViT
from .pos_embed import resample_pos_embed, sincos_2d
from .registry import create_model, list_models, model_config
