"""Per-architecture mappings, registered by Hugging Face ``model_type``.

``registry.py`` holds ``ARCHS``, the :class:`Arch` base, :class:`HFFields`
and the helpers every architecture shares; importing this package registers
the architectures: ``deepseek.py`` (DeepSeek-V3, V3.2), ``deepseek_v4.py``,
``qwen_mixtral.py`` (Qwen3-MoE, Mixtral).
"""

from moejax.interop.archs.registry import ARCHS, Arch, HFFields

from moejax.interop.archs import deepseek, deepseek_v4, qwen_mixtral  # noqa: F401,I001  (registers them)

__all__ = ["ARCHS", "Arch", "HFFields"]
