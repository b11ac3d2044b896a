"""Per-architecture mappings, registered by Hugging Face ``model_type``.

``registry.py`` holds ``ARCHS``, the :class:`Arch` base, :class:`HFFields`
and the helpers every architecture shares; importing this package registers
the architectures: ``deepseek.py`` (DeepSeek-V3, V3.2), ``deepseek_v4.py``,
``qwen_mixtral.py`` (Qwen3-MoE, Mixtral), ``dense.py`` (Llama, Qwen3),
``glm4_moe.py`` (GLM-4-MoE; ``gqa.py`` holds what the GQA architectures share).
"""

from moejax.interop.archs.registry import ARCHS, Arch, HFFields

from moejax.interop.archs import deepseek, deepseek_v4, dense, glm4_moe, qwen_mixtral  # noqa: F401,I001  (registers them)

__all__ = ["ARCHS", "Arch", "HFFields"]
