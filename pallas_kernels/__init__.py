"""Pallas GPU kernels for Qwen3 inference, one family per module, each beside its pure-jnp `*_reference`.

rms_norm          RMSNorm, optionally fused with the residual add
qkv_rope          q/k/v projection epilogue: per-head q/k RMSNorm and rotary embedding
attention         causal GQA flash attention for prefill and chunked prefill
decode_attention  GQA flash-decoding (one query token per row, split along the sequence)
"""
