"""Pure array math (no Flax): attention, RoPE, norms/MLP, losses. Modules in jaxlm.model call these."""

from jaxlm.ops.attention import attention, attention_reference, make_mask
from jaxlm.ops.attention_kernels import resolve_attn_impl
from jaxlm.ops.head_loss import head_loss, head_nll
from jaxlm.ops.layers import dropout, rms_norm, swiglu
from jaxlm.ops.linear_attention import linear_attention, linear_attention_reset
from jaxlm.ops.losses import bits_per_byte, masked_loss, token_nll
from jaxlm.ops.rope import apply_rope, rope_angles

__all__ = ["attention", "attention_reference", "make_mask", "resolve_attn_impl", "dropout", "rms_norm", "swiglu",
           "masked_loss", "head_nll", "head_loss",
           "token_nll", "bits_per_byte", "apply_rope", "rope_angles", "linear_attention",
           "linear_attention_reset"]
