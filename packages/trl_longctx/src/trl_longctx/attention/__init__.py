"""Attention for long sequences: flex attention with learned sinks and sliding windows, memory linear in the sequence
(`flex_sinks`), and which attention the trainer's model runs (`selection`)."""

from .flex_sinks import LONGCTX_FLEX, flex_attention_forward, register_flex_attention, sink_flex_attention
from .selection import AttentionChoice, choose_attention, has_attention_sinks, use_flex_attention

__all__ = [
    "LONGCTX_FLEX",
    "AttentionChoice",
    "choose_attention",
    "flex_attention_forward",
    "has_attention_sinks",
    "register_flex_attention",
    "sink_flex_attention",
    "use_flex_attention",
]
