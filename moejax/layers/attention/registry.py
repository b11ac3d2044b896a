"""``ATTENTION``: the attention-type registry (``model.attention_types``).

Every type is a Linen module ``cls(cfg=model_cfg)`` (see the package
docstring for the call and ``decode`` signatures). A type is *decodable*
(``moejax generate``, ``moejax.generate.check_decodable``) when it has a
``decode`` method. It declares what else it is as class attributes (each
defaults to the value below), and the config checks, context parallelism and
QK-clip read those declarations, never type names:

  windowed        reads ``model.attention.window``; under context parallelism
                  its window arrives as a halo from the previous shard
  rope_dim        reads ``model.attention.rope_dim`` (partial rope)
  qk_norm         honours ``model.attention.qk_norm`` (per-head q/k RMSNorm)
  qk_clip_params  the (query, key) per-head projection names QK-clip rescales,
                  or None: QK-clip cannot apply (latent / shared-KV projections)
  needs_q_lora    needs ``model.attention.q_lora_rank >= 1``
  latent_kv       reads the MLA fields (kv_lora_rank, qk_*_head_dim, v_head_dim)
  grouped_output  reads o_groups / o_lora_rank (grouped low-rank output)
  indexed         reads the lightning-indexer fields (index_*, indexer_*)
  library_kernels runs ``attention.implementation`` = cudnn / tokamax (its
                  core is plain causal GQA attention over one [T, T] mask)
  validate_config ``(cfg) -> list[str]``: checks of the type's own fields

``moejax/layers/attention/checks.py`` holds the checks shared by all types.
The registry has its own module so that attention modules register
themselves without importing the package that imports them.
"""

from moejax.registry import Registry

ATTENTION = Registry("attention type", capabilities=dict(
    windowed=False, rope_dim=False, qk_norm=False, qk_clip_params=None, needs_q_lora=False, latent_kv=False,
    grouped_output=False, indexed=False, library_kernels=False))
