"""mae_fast: fast masked-autoencoder pretraining of Vision Transformers at high resolution."""
from . import ops
from .models import (
    CheckpointError,
    MAEOutput,
    MaskedAutoencoderViT,
    create_model,
    create_timm_encoder,
    export_timm,
    list_models,
    load_pretrained,
)

__version__ = "0.1.0"
__all__ = ["ops", "create_model", "list_models", "export_timm", "load_pretrained", "create_timm_encoder",
           "MaskedAutoencoderViT", "MAEOutput", "CheckpointError", "__version__"]
