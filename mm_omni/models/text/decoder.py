"""Qwen2 text decoder with M-RoPE (Qwen2.5-Omni's thinker LLM) on megatron-core.

``TextDecoder`` is the omni model's ``text_decoder``; its parameters carry MindSpeed-MM's names:
``embedding.word_embeddings`` (vocab-parallel), ``decoder.layers.N...`` (megatron-core
``TransformerBlock``: RMSNorm, GQA self-attention with a QKV bias, SwiGLU, no other bias),
``decoder.final_layernorm`` and ``output_layer`` (column-parallel; absent when tied to the
embedding). Built on megatron's ``LanguageModule`` so pipeline stages get its tied-embedding
bookkeeping (first/last stage copies, ``shared_embedding_or_output_weight``).

Batches come either padded, ``[b, s]`` with an ``attention_mask`` (left or right padding; right
padding needs no mask beyond causality, see :func:`is_right_padded`), or
packed, ``b = 1`` with ``cu_seqlens`` marking where each sequence starts (the fast path on GPU:
one varlen attention call, no padding).

Parallelism beyond megatron's layers: with sequence parallelism the (full-length) decoder input is
scattered over the TP ranks here, after the omni model merged the media features into it; the output
layer gathers the sequence back before the loss. With context parallelism
(``context_parallel_size > 1``) this rank keeps its zig-zag share of every sequence
(:mod:`mm_omni.parallel.context_parallel`) of the embeddings, positions and shifted targets, before
the sequence-parallel scatter; ``per_token_loss`` / ``loss_mask`` / ``logits`` are then this rank's
tokens only, and ``loss`` is the mean over the whole sequence (its gradient is this rank's share).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from mm_omni.config.model import TextDecoderConfig
from mm_omni.models.common.attention import packed_params
from mm_omni.models.common.layer_spec import transformer_block_spec
from mm_omni.models.common.rotary import mrope_freqs
from mm_omni.models.common.transformer_config import megatron_transformer_config
from mm_omni.models.text.fused_loss import output_layer_lm_loss
from mm_omni.models.text.loss import IGNORE_INDEX, mean_loss, shift_labels, vocab_parallel_lm_loss
from mm_omni.parallel.context_parallel import mean_loss_over_group, split_for_context_parallel
from mm_omni.platform import get_platform


def text_transformer_config(cfg: TextDecoderConfig, **overrides) -> TransformerConfig:
    """Qwen2 blocks: RMSNorm, a gated MLP (SwiGLU in Qwen2.5-Omni), GQA with a QKV bias and no other linear
    bias. (model.json's schema already refused rope scaling other than plain M-RoPE.)"""
    groups = cfg.num_query_groups if cfg.group_query_attention else cfg.num_attention_heads
    add_bias = (not cfg.disable_bias_linear) if cfg.add_bias_linear is None else cfg.add_bias_linear
    kwargs = dict(
        num_query_groups=groups, kv_channels=cfg.head_dim, add_bias_linear=add_bias,
        add_qkv_bias=cfg.add_qkv_bias, init_method_std=cfg.init_method_std,
        attention_softmax_in_fp32=cfg.attention_softmax_in_fp32,
    )
    kwargs.update(overrides)
    return megatron_transformer_config(cfg, **kwargs)


@dataclass
class DecoderOutput:
    """What a forward returns. On a stage without ``post_process`` only ``hidden_states`` is set."""

    loss: Optional[torch.Tensor] = None  # mean over label tokens, scalar
    per_token_loss: Optional[torch.Tensor] = None  # [b, s], 0 where there is no target
    loss_mask: Optional[torch.Tensor] = None  # [b, s], 1 where there is a target
    logits: Optional[torch.Tensor] = None  # [b, s, vocab] (gathered over TP), when asked for
    hidden_states: Optional[torch.Tensor] = None  # [s, b, h] output of a non-last pipeline stage


def padding_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """HF-style ``[b, s]`` keep-mask (1 = token) -> megatron's causal mask ``[b, 1, s, s]`` (True = masked).

    Padding *queries* keep their own diagonal so no row is fully masked (a fully masked row is NaN
    in some SDPA kernels, and a NaN there would leak into gradients through 0 * NaN); real tokens
    never see padding keys, so their outputs are exact for left and right padding alike.
    """
    b, s = attention_mask.shape
    keep = attention_mask.bool()
    causal = torch.ones(s, s, dtype=torch.bool, device=keep.device).tril()
    allowed = (causal & keep[:, None, :]) | torch.eye(s, dtype=torch.bool, device=keep.device)
    return ~allowed[:, None]


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row of the ``[b, s]`` keep-mask is its tokens, then padding (what the collator makes).

    Then causal attention alone keeps every real token off the padding keys (they all come after it),
    so no ``[b, 1, s, s]`` mask is built and the causal kernels run, which skip the masked half of the
    score blocks (an explicit mask is read for all of them). Only the padding positions' own outputs
    change, and they carry no target. A host mask (``omni_task`` keeps it there) costs no device sync.
    """
    keep = attention_mask.bool()
    return not bool((keep[:, 1:] & ~keep[:, :-1]).any())


def default_position_ids(b: int, s: int, device, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Text-only positions ``[3, b, s]``: 0.. per row, or per packed sequence when ``cu_seqlens`` is given."""
    pos = torch.arange(s, device=device)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device, torch.long)
        pos = pos - torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=s)
    return pos.view(1, 1, s).expand(3, b, s)


class TextDecoder(LanguageModule):
    """Embedding -> megatron ``TransformerBlock`` (M-RoPE) -> final norm -> output layer -> loss."""

    def __init__(
        self,
        cfg: TextDecoderConfig,
        pre_process: bool = True,
        post_process: bool = True,
        pg_collection=None,
        vp_stage: Optional[int] = None,
        config_overrides: Optional[dict] = None,
    ):
        get_platform()  # installs the CPU adapter before megatron modules are built
        config = text_transformer_config(cfg, **(config_overrides or {}))
        super().__init__(config=config, pg_collection=pg_collection)
        tp = self.tp_group.size() if self.tp_group is not None else 1
        if cfg.vocab_size % tp:
            raise ValueError(f"text_decoder.vocab_size={cfg.vocab_size} is not divisible by the tensor-parallel "
                             f"size {tp}: pad the vocabulary (and the checkpoint) to a multiple of {tp}")
        self.cfg = cfg
        self.pre_process, self.post_process, self.vp_stage = pre_process, post_process, vp_stage
        self.share_embeddings_and_output_weights = not cfg.untie_embeddings_and_output_weights
        self.fused_lm_loss = True  # False: output_layer's full logits + megatron's vocab-parallel cross entropy
        if pre_process:
            # no sequence-parallel scatter here: the omni model merges media into full-length embeddings first
            self.embedding = LanguageModelEmbedding(
                config, vocab_size=cfg.vocab_size, max_sequence_length=cfg.max_position_embeddings,
                position_embedding_type="none", scatter_to_sequence_parallel=False, tp_group=self.tp_group,
            )
        self.decoder = TransformerBlock(
            config, transformer_block_spec(config, AttnMaskType.causal, vp_stage), post_layer_norm=True,
            pre_process=pre_process, post_process=post_process, pg_collection=self.pg_collection,
            vp_stage=vp_stage,
        )
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, cfg.vocab_size, config=config, init_method=config.init_method,
                bias=False, skip_bias_add=False, gather_output=False,
                skip_weight_param_allocation=pre_process and self.share_embeddings_and_output_weights,
                tp_group=self.tp_group,
            )
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline stages after the first get their input from the previous stage (megatron's schedule)."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings ``[s, b, h]`` (megatron layout) of ``input_ids`` [b, s]; first stage only.

        With ``pad_token_id`` set, the lookups of that id pass no gradient, so its embedding row gets none
        from them: torch's ``Embedding(padding_idx=...)``, which transformers builds and megatron's
        ``VocabParallelEmbedding`` lacks. Masking the lookups (not the row's gradient) keeps what a tied
        output layer gives that row, and holds on every TP rank: each has the lookups' output after the
        all-reduce over the vocabulary shards, and the rank owning the row gets the masked gradient.
        """
        emb = self.embedding(input_ids=input_ids, position_ids=None)
        if self.cfg.pad_token_id is None:
            return emb
        is_pad = (input_ids == self.cfg.pad_token_id).t()[..., None]  # [s, b, 1]
        return torch.where(is_pad, emb.detach(), emb)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        decoder_input: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        return_logits: bool = False,
    ) -> DecoderOutput:
        """Run the decoder.

        ``input_ids`` / ``labels`` / ``attention_mask`` are ``[b, s]``; ``position_ids`` are M-RoPE's
        ``[3, b, s]`` (a ``[b, s]`` tensor is used on all three axes; ``None`` = text positions).
        ``decoder_input`` ([s, b, h]) replaces the embedding of ``input_ids`` (the omni model's merged
        text + media embeddings). ``cu_seqlens`` marks packed sequences in a ``b = 1`` row; then
        ``attention_mask`` is ignored.
        """
        if self.pre_process:
            hidden = decoder_input if decoder_input is not None else self.embed(input_ids)
            s, b, device = hidden.shape[0], hidden.shape[1], hidden.device
        else:
            hidden = None  # the block uses the tensor handed over by set_input_tensor
            ref = labels if labels is not None else input_ids if input_ids is not None else position_ids
            if ref is None:
                raise ValueError("a later pipeline stage needs labels, input_ids or position_ids for the shapes")
            b, s, device = ref.shape[-2], ref.shape[-1], ref.device
        if cu_seqlens is not None and b != 1:
            raise ValueError(f"packed input (cu_seqlens) needs batch size 1; got b={b}")
        cp_group = self.cp_group if self.config.context_parallel_size > 1 else None
        split = split_for_context_parallel(cp_group, s, cu_seqlens, device)
        if hidden is not None:
            if split is not None:  # after the media scatter (omni model), before the sequence-parallel scatter
                hidden = split.take(hidden, 0)
            if self.config.sequence_parallel:
                hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden, group=self.tp_group)

        packed_seq_params, mask = None, None
        if cu_seqlens is not None:
            # a packed row has no padding: cu_seqlens alone say what attends to what (any mask is ignored)
            packed_seq_params = split.packed_params() if split is not None else packed_params(cu_seqlens.to(device))
        elif split is not None:
            mask = split.attention_mask(None if attention_mask is None else attention_mask.to(device))
        elif attention_mask is not None and not is_right_padded(attention_mask):
            mask = padding_attention_mask(attention_mask.to(device))

        if position_ids is None:
            position_ids = default_position_ids(b, s, device, cu_seqlens)
        elif position_ids.dim() == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        if split is not None:
            position_ids = split.take(position_ids.to(device), 2)
        freqs = mrope_freqs(position_ids.to(device), self.cfg.head_dim, self.cfg.mrope_section, self.cfg.rope_theta)

        hidden = self.decoder(hidden, attention_mask=mask, rotary_pos_emb=freqs, packed_seq_params=packed_seq_params)
        if not self.post_process:
            return DecoderOutput(hidden_states=hidden)

        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        # the training path: output layer + loss in token chunks, no full logits (fused_loss.py)
        fused = (labels is not None and not return_logits and self.fused_lm_loss
                 and type(self.output_layer) is tensor_parallel.ColumnParallelLinear)
        logits = None if fused else self.output_layer(hidden, weight=weight)[0]  # [s, b, vocab / tp]
        out = DecoderOutput()
        if return_logits:
            full = tensor_parallel.gather_from_tensor_model_parallel_region(logits, group=self.tp_group)
            out.logits = full.transpose(0, 1)
            logits = logits.clone()  # the loss kernel below overwrites fp32 logits in place
        if labels is not None:
            targets = shift_labels(labels.to(device), cu_seqlens)  # on the full sequence, then split
            if split is not None:
                targets = split.take(targets, 1)
            if fused:
                out.per_token_loss, out.loss_mask = output_layer_lm_loss(
                    self.output_layer, hidden, weight, targets, IGNORE_INDEX)
            else:
                out.per_token_loss, out.loss_mask = vocab_parallel_lm_loss(logits, targets)
            if split is not None:
                out.loss = mean_loss_over_group(out.per_token_loss, out.loss_mask, split.group)
            else:
                out.loss = mean_loss(out.per_token_loss, out.loss_mask)
        return out
