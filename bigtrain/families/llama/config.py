"""The ``model.*`` section of ``model.family: llama`` and its size presets."""

from __future__ import annotations

from dataclasses import dataclass

from bigtrain.config.core import doc
from bigtrain.config.schema import ModelConfig


@dataclass
class LlamaModelConfig(ModelConfig):
    variant: str = doc("debug", "Size preset: debug, 1B (Llama-3.2-1B's trunk), 7B (Llama-2-7B's trunk) or 'custom'; "
                       "fills width/depth/num_heads/num_kv_heads/mlp_dim left at 0.")
    width: int = doc(0, "Hidden size; 0 = from variant.", ge=0)
    depth: int = doc(0, "Decoder layers; 0 = from variant.", ge=0)
    num_heads: int = doc(0, "Query heads; 0 = from variant.", ge=0)
    num_kv_heads: int = doc(0, "Key/value heads (grouped-query attention); 0 = from variant, or num_heads.", ge=0)
    mlp_dim: int = doc(0, "SwiGLU hidden size; 0 = from variant.", ge=0)
    vocab_size: int = doc(0, "Vocabulary size; 0 = from model.pretrained, else 257 (bytes + end-of-text, the "
                          "stdlib_text tokenizer).", ge=0)
    seq_len: int = doc(128, "Tokens per training sequence.", gt=0)
    pretrained: str = doc(
        "", "Weights to start from: a local Hugging Face model directory (config.json + safetensors; Llama, Mistral "
        "or Qwen2 architecture) or a bigtrain checkpoint of this family (e.g. a teacher: teacher.pretrained). Its "
        "sizes fill the size keys (set ones must agree) and each rank reads only the slices of the weights it holds. "
        "'' = initialise from train.seed.")


PRESETS = {
    "debug": {"width": 64, "depth": 4, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 128},
    "1B": {"width": 2048, "depth": 16, "num_heads": 32, "num_kv_heads": 8, "mlp_dim": 8192},
    "7B": {"width": 4096, "depth": 32, "num_heads": 32, "num_kv_heads": 32, "mlp_dim": 11008},
}
