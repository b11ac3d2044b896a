"""Interoperability with other frameworks' checkpoints.

``moejax.interop.hf``: Hugging Face ``transformers`` checkpoints (DeepSeek-V3,
V3.2, V4, Qwen3-MoE, Mixtral) both ways, with logits parity; see
docs/interop.md. Needs the ``interop`` extra (torch, transformers, safetensors).
"""
