"""The attention core shared by the vision, audio and text stacks.

It replaces megatron-core's ``core_attention`` (``DotProductAttention`` materialises the
score matrix and runs at about half the speed of SDPA). The backend comes from
``platform.get_platform().attention_backend``:

* ``sdpa``        CUDA: ``torch.nn.attention.varlen.varlen_attn`` (flash) for packed sequences,
                  ``F.scaled_dot_product_attention`` (cuDNN / flash) for padded batches.
* ``npu_fusion``  Ascend: ``torch_npu.npu_fusion_attention`` (TND layout for packed sequences).
* ``sdpa_math``   CPU: SDPA with a block-diagonal (and causal) boolean mask.

Packed sequences travel as megatron's ``PackedSeqParams`` with ``qkv_format="sbhd"`` and batch 1:
the tensors keep megatron's ``[s, b, h, d]`` layout (so per-token rotary tables apply unchanged)
and ``cu_seqlens_q`` marks where each sequence (image, window, audio chunk, text row) starts.
A stack that needs a different segmentation per layer (the vision encoder's window / full
attention layers) passes a :class:`LayerwisePackedSeqParams`.

Context parallelism (the text decoder's ``--context-parallel-size``; megatron-core's own CP attention
needs TransformerEngine). Each CP rank holds ``s / cp`` tokens of every sequence in the zig-zag layout
of :mod:`mm_omni.models.common.context_parallel`. We **all-gather K and V** over the CP group and attend the
local queries to the full keys, rather than passing K/V blocks around a ring:

* exact and simple: one softmax over the whole key range, no online-softmax merging of partial
  results, the same kernels as without CP (SDPA with a mask; flash varlen on CUDA);
* cheap where we use it: with GQA the K/V of Qwen2.5-Omni are small (7B: 4 groups x 128 = 512 values
  per token for K, as many for V, against 3584 for the hidden state), so gathering them for CP 2-8 moves
  less than one all-gather of the activations; the gathered K/V of one layer live only during its
  attention (``s x 1024`` values per token-row: 64 MiB at 32k tokens in bf16);
* what it gives up: a ring overlaps the transfer with compute and never holds the full K/V; at CP
  > 8 or sequences of several 100k tokens, a ring (TE's ``p2p``) is the better trade.

Causality is expressed in global positions: the gathered rows come in rank order (their positions are
``ContextParallelSplit.kv_index``), and the decoder passes a mask ``[b, 1, s / cp, s]`` for padded
batches or a :class:`~mm_omni.models.common.context_parallel.ContextParallelPackedSeqParams` for packed
rows. Without a mask, a causal layer builds the zig-zag causal mask of a full (unpadded) batch itself.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from mm_omni.models.common.context_parallel import (
    ContextParallelPackedSeqParams, gather_sequence, split_for_context_parallel,
)
from mm_omni.platform import get_platform


@dataclass
class LayerwisePackedSeqParams(PackedSeqParams):
    """Packed-sequence boundaries that differ per layer.

    ``per_layer`` maps a 0-based layer index (megatron's ``layer_number - 1``, global across
    pipeline stages) to its own ``PackedSeqParams``; layers not in it use this object's own
    ``cu_seqlens_q``.
    """

    per_layer: dict = field(default_factory=dict)

    def for_layer(self, layer_index: int) -> PackedSeqParams:
        return self.per_layer.get(layer_index, self)


def packed_params(cu_seqlens: torch.Tensor) -> PackedSeqParams:
    """PackedSeqParams for self-attention within the segments given by ``cu_seqlens``."""
    cu_seqlens = cu_seqlens.to(torch.int32)
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    return PackedSeqParams(
        qkv_format="sbhd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
    )


def block_diagonal_mask(cu_seqlens: torch.Tensor, causal: bool) -> torch.Tensor:
    """Boolean [t, t] mask, True where attention is allowed (same segment, and causal if asked)."""
    total = int(cu_seqlens[-1])
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)
    allowed = segment[:, None] == segment[None, :]
    if causal:
        pos = torch.arange(total, device=cu_seqlens.device)
        allowed = allowed & (pos[:, None] >= pos[None, :])
    return allowed


class CoreAttention(MegatronModule):
    """Drop-in ``core_attention`` for megatron-core's ``SelfAttention``.

    Inputs are megatron's ``[s, b, heads, head_dim]`` (keys/values may have fewer heads: GQA);
    the output is ``[s, b, heads * head_dim]``. ``attention_mask`` follows megatron's convention
    (boolean, True = masked out, broadcastable to ``[b, 1, s, s]``).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        # CP only where the stack's config asks for it (the encoders share the process groups but
        # never split their sequences); the group comes with megatron's pg_collection
        self.cp_group = None
        if config.context_parallel_size > 1:
            self.cp_group = getattr(pg_collection, "cp", None)
            if self.cp_group is None:
                from megatron.core import parallel_state

                self.cp_group = parallel_state.get_context_parallel_group()
            if self.cp_group.size() != config.context_parallel_size:
                raise ValueError(f"context_parallel_size={config.context_parallel_size} but the CP process group "
                                 f"has {self.cp_group.size()} ranks")
        self.layer_index = max(1, layer_number) - 1
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim**-0.5
        self.backend = get_platform().attention_backend

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by mm_omni's CoreAttention")
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        dropout = self.dropout_p if self.training else 0.0
        if isinstance(packed_seq_params, LayerwisePackedSeqParams):
            packed_seq_params = packed_seq_params.for_layer(self.layer_index)
        s, b, hq, d = query.shape
        if self.cp_group is not None and self.cp_group.size() > 1:
            out = self._context_parallel(query, key, value, attention_mask, packed_seq_params, causal, dropout)
            return out.reshape(s, b, hq * d)
        if packed_seq_params is not None:
            if b != 1:
                raise ValueError(f"packed sequences need batch size 1 in [s, b, h, d]; got b={b}")
            # squeeze (a view) rather than [:, 0]: its backward needs no zero-filled copy
            out = self._packed(query.squeeze(1), key.squeeze(1), value.squeeze(1), packed_seq_params, causal, dropout)
            return out.reshape(s, 1, hq * d)
        out = self._padded(query, key, value, attention_mask, causal, dropout)
        return out.reshape(s, b, hq * d)

    # -- padded batches ---------------------------------------------------------------------
    def _padded(self, q, k, v, attention_mask, causal, dropout):
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        mask = None
        if attention_mask is not None:
            mask = ~attention_mask  # SDPA: True = attend
            causal = False  # megatron masks passed explicitly already carry causality
        if self.backend == "npu_fusion":
            out = _npu_attention_bnsd(q, k, v, mask, causal, self.softmax_scale, dropout)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1],
            )
        return out.permute(2, 0, 1, 3)  # [s, b, h, d]

    # -- context parallel: local queries, K/V gathered over the CP group -------------------------
    def _context_parallel(self, q, k, v, attention_mask, params, causal, dropout):
        if self.backend == "npu_fusion":
            raise NotImplementedError("context parallelism on Ascend: use MindSpeed's CP; mm_omni's CP attention "
                                      "runs on CUDA and CPU")
        k, v = gather_sequence(k, self.cp_group), gather_sequence(v, self.cp_group)
        if isinstance(params, ContextParallelPackedSeqParams):
            q, k, v = q.squeeze(1), k.squeeze(1), v.squeeze(1)
            if self.backend == "sdpa" and dropout == 0.0 and q.dtype in (torch.float16, torch.bfloat16):
                # causal with q shorter than k aligns bottom-right: each chunk sees its keys up to its own end
                kv = params.kv_gather.to(q.device)
                return varlen_attention(q, k.index_select(0, kv), v.index_select(0, kv), params.cu_seqlens_q,
                                        params.max_seqlen_q, causal, self.softmax_scale,
                                        cu_seqlens_kv=params.cu_seqlens_kv, max_len_kv=params.max_seqlen_kv)[:, None]
            mask = params.dense_mask()
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                attn_mask=~mask.to(q.device), dropout_p=dropout, scale=self.softmax_scale,
                enable_gqa=k.shape[1] != q.shape[1],
            )
            return out[0].transpose(0, 1)[:, None]
        if params is not None:
            raise ValueError("packed sequences under context parallelism need ContextParallelPackedSeqParams "
                             "(mm_omni.models.common.context_parallel.split_for_context_parallel(...).packed_params())")
        if attention_mask is None and causal:
            split = split_for_context_parallel(self.cp_group, k.shape[0], device=q.device)
            attention_mask = split.attention_mask()
        return self._padded(q, k, v, attention_mask, causal and attention_mask is None, dropout)

    # -- packed sequences (t, h, d) --------------------------------------------------------
    def _packed(self, q, k, v, params: PackedSeqParams, causal, dropout):
        cu = params.cu_seqlens_q
        # flash varlen takes fp16/bf16 only; fp32 (e.g. parity checks on GPU) uses the masked SDPA below
        if self.backend == "sdpa" and dropout == 0.0 and q.dtype in (torch.float16, torch.bfloat16):
            max_len = params.max_seqlen_q or int((cu[1:] - cu[:-1]).max())
            return varlen_attention(q, k, v, cu, max_len, causal, self.softmax_scale)
        if self.backend == "npu_fusion":
            return _npu_attention_tnd(q, k, v, cu, causal, self.softmax_scale, dropout)
        mask = block_diagonal_mask(cu, causal)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            attn_mask=mask, dropout_p=dropout, scale=self.softmax_scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        return out[0].transpose(0, 1)


@functools.lru_cache(maxsize=None)
def _varlen_takes_enable_gqa() -> bool:
    from torch.nn.attention.varlen import varlen_attn

    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def varlen_attention(q, k, v, cu_seqlens, max_len, causal, scale=None, cu_seqlens_kv=None, max_len_kv=None):
    """Flash varlen attention on [t, h, d]. GQA is native to the flash kernel; torch >= 2.12
    only asks for the flag (torch 2.11 has no such argument). Keys may be segmented differently
    (``cu_seqlens_kv``, context parallel); causal masking then aligns each segment bottom-right."""
    from torch.nn.attention.varlen import varlen_attn

    extra = {"enable_gqa": k.shape[1] != q.shape[1]} if _varlen_takes_enable_gqa() else {}
    cu_kv = cu_seqlens if cu_seqlens_kv is None else cu_seqlens_kv
    return varlen_attn(
        q, k, v, cu_seqlens, cu_kv, max_len, max_len if max_len_kv is None else max_len_kv, scale=scale,
        window_size=(-1, 0) if causal else (-1, -1), **extra,
    )


def _torch_npu():
    return importlib.import_module("torch_npu")


def _npu_attention_bnsd(q, k, v, keep_mask, causal, scale, dropout):
    """Ascend fused attention, BNSD layout. Untested on real Ascend hardware (no NPU here)."""
    b, n, s, _ = q.shape
    if keep_mask is None and causal:
        keep_mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    atten_mask = None if keep_mask is None else ~keep_mask.expand(b, 1, s, s)
    return _torch_npu().npu_fusion_attention(
        q, k, v, n, "BNSD", atten_mask=atten_mask, scale=scale, keep_prob=1.0 - dropout,
        sparse_mode=0,
    )[0]


def _npu_attention_tnd(q, k, v, cu_seqlens, causal, scale, dropout):
    """Ascend fused attention on packed sequences, TND layout. Untested on real Ascend hardware."""
    n = q.shape[1]
    seqlens = cu_seqlens[1:].tolist()
    atten_mask = None
    sparse_mode = 0
    if causal:
        atten_mask = torch.ones(2048, 2048, dtype=torch.bool, device=q.device).triu(1)
        sparse_mode = 3
    return _torch_npu().npu_fusion_attention(
        q, k, v, n, "TND", atten_mask=atten_mask, scale=scale, keep_prob=1.0 - dropout,
        actual_seq_qlen=seqlens, actual_seq_kvlen=seqlens, sparse_mode=sparse_mode,
    )[0]
