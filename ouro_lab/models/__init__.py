"""Models: pure `nn.Module`s (see transformer.py)."""

from ouro_lab.models.transformer import LMOutput, LoopedLM, ModelSpec, StandardLM

__all__ = ["LMOutput", "LoopedLM", "ModelSpec", "StandardLM"]
