"""Qwen2 text decoder with M-RoPE (Qwen2.5-Omni's thinker LLM) on megatron-core, and its Qwen3-MoE form.

``TextDecoder`` is the omni model's ``text_decoder``; its parameters carry MindSpeed-MM's names:
``embedding.word_embeddings`` (vocab-parallel), ``decoder.layers.N...`` (megatron-core
``TransformerBlock``: RMSNorm, GQA self-attention with a QKV bias, SwiGLU, no other bias),
``decoder.final_layernorm`` and ``output_layer`` (column-parallel; absent when tied to the
embedding). The config adds what Qwen3-MoE decoders (Qwen3-Omni's thinker) have: a head size of their
own (``kv_channels``), RMSNorm on each query / key head (``qk_layernorm``: ``self_attention.q_layernorm``
/ ``k_layernorm``), interleaved M-RoPE (``mrope_interleaved``) and megatron's mixture-of-experts layers
(``num_moe_experts``: ``mlp.router.weight``, ``mlp.experts.local_experts.E.linear_fc1/2``; the
load-balancing loss and its scale are described in :mod:`mm_omni.models.text.moe`). Built on megatron's ``LanguageModule`` so pipeline stages get its tied-embedding
bookkeeping (first/last stage copies, ``shared_embedding_or_output_weight``).

Batches come either padded, ``[b, s]`` with an ``attention_mask`` (left or right padding), or
packed, ``b = 1`` with ``cu_seqlens`` marking where each sequence starts (the fast path on GPU:
one varlen attention call, no padding).

Where the tokens of a forward sit is the ``layout``'s business (:mod:`mm_omni.models.text.layout`):
by default every token on this rank; with sequence or context parallelism the caller passes the
parallel layout (:func:`mm_omni.parallel.decoder_layout.decoder_layout`), which scatters the
(full-length) decoder input over the TP ranks after the omni model merged the media features into it
and, under CP, keeps this rank's zig-zag share of every sequence of the embeddings, positions and
shifted targets; ``per_token_loss`` / ``loss_mask`` / ``logits`` are then this rank's tokens only, and
``loss`` is the mean over the whole sequence (its gradient is this rank's share). The output layer
gathers a sequence-parallel sequence back before the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from mm_omni.config.model import TextDecoderConfig
from mm_omni.models.common.layer_spec import transformer_block_spec
from mm_omni.models.common.rotary import interleaved_mrope_freqs, mrope_freqs
from mm_omni.models.common.transformer_config import megatron_transformer_config
from mm_omni.models.text.fused_loss import output_layer_lm_loss
from mm_omni.models.text.layout import TokenLayout
from mm_omni.models.text.loss import IGNORE_INDEX, vocab_parallel_lm_loss
from mm_omni.models.text.moe import moe_transformer_config
from mm_omni.platform import get_platform


def text_transformer_config(cfg: TextDecoderConfig, **overrides) -> TransformerConfig:
    """Qwen2 blocks: RMSNorm, a gated MLP (SwiGLU in Qwen2.5-Omni), GQA with a QKV bias and no other linear
    bias; with ``qk_layernorm`` / ``num_moe_experts`` set, Qwen3-MoE blocks. (model.json's schema already
    refused rope scaling other than plain M-RoPE.)"""
    groups = cfg.num_query_groups if cfg.group_query_attention else cfg.num_attention_heads
    add_bias = (not cfg.disable_bias_linear) if cfg.add_bias_linear is None else cfg.add_bias_linear
    kwargs = dict(
        num_query_groups=groups, kv_channels=cfg.head_dim, add_bias_linear=add_bias,
        add_qkv_bias=cfg.add_qkv_bias, init_method_std=cfg.init_method_std,
        attention_softmax_in_fp32=cfg.attention_softmax_in_fp32,
    )
    if cfg.qk_layernorm:
        kwargs["qk_layernorm"] = True  # also makes finalize_model_grads sum their gradients over TP
    if cfg.num_moe_experts is not None:
        kwargs.update(moe_transformer_config(cfg))
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
    # packed input: [b, s] like loss_mask, the sequence of cu_seqlens each position belongs to, and how
    # many sequences there are (the same on every rank of a context-parallel group)
    segment_ids: Optional[torch.Tensor] = None
    num_segments: Optional[int] = None


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
        if cfg.num_moe_experts is not None and tp > 1 and not config.sequence_parallel:
            # megatron's dispatchers gather the tokens over TP x EP: without SP every TP rank would add
            # the same tokens again (and the load-balancing counts with them)
            raise ValueError(f"text_decoder.num_moe_experts={cfg.num_moe_experts} at tensor-parallel size {tp} "
                             "needs sequence parallelism: pass --sequence-parallel (or use TP 1)")
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
        """Pipeline stages after the first get their input from the previous stage (megatron's schedule).

        A tensor wider than the hidden size carries the layer additions still to come (see :meth:`forward`)
        after the hidden states: they are split off here, as views, so their gradient flows back too."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.carried_additions = None
        h = self.config.hidden_size
        if input_tensor is not None and input_tensor.shape[-1] > h:
            input_tensor, self.carried_additions = input_tensor[..., :h], input_tensor[..., h:]
        self.decoder.set_input_tensor(input_tensor)

    def layer_range(self) -> range:
        """The global (0-based) indexes of this stage's decoder layers."""
        layers = self.decoder.layers
        return range(layers[0].layer_number - 1, layers[-1].layer_number) if len(layers) else range(0)

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
        layout: Optional[Callable[..., TokenLayout]] = None,
        layer_additions: Optional[torch.Tensor] = None,
    ) -> DecoderOutput:
        """Run the decoder.

        ``input_ids`` / ``labels`` / ``attention_mask`` are ``[b, s]``; ``position_ids`` are M-RoPE's
        ``[3, b, s]`` (a ``[b, s]`` tensor is used on all three axes; ``None`` = text positions).
        ``decoder_input`` ([s, b, h]) replaces the embedding of ``input_ids`` (the omni model's merged
        text + media embeddings). ``cu_seqlens`` marks packed sequences in a ``b = 1`` row; then
        ``attention_mask`` is ignored. ``layout``: ``(s, b, device, cu_seqlens, attention_mask) ->``
        :class:`TokenLayout` of this forward's tokens (default: all of them on this rank; required
        under sequence or context parallelism).

        ``layer_additions`` ([s, b, k * h], full length like ``decoder_input``; first stage): block ``i`` is
        added to the output of decoder layer ``i`` for ``i < k`` (Qwen3-VL's deepstack features, zero away
        from the visual tokens). It is split over ranks like the hidden states and travels into the layers
        as their ``context`` (an input of megatron's activation recompute, so a recomputed layer adds the
        same tensor); a pipeline stage whose layers end before layer ``k - 1`` sends it on after its hidden
        states, ``[s, b, h + k * h]``, and the next stage splits it off again (:meth:`set_input_tensor`).
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
        if layout is None:
            if self.config.context_parallel_size > 1 or self.config.sequence_parallel:
                raise ValueError(
                    f"context_parallel_size={self.config.context_parallel_size}, sequence_parallel="
                    f"{self.config.sequence_parallel}: the decoder's tokens are spread over ranks; pass "
                    "layout=mm_omni.parallel.decoder_layout.decoder_layout(decoder) (the omni task does)")
            layout = TokenLayout
        tokens = layout(s, b, device, cu_seqlens, attention_mask)
        if hidden is not None:
            hidden = tokens.input(hidden)  # after the media scatter (omni model)
            additions = None if layer_additions is None else tokens.input(layer_additions)
        else:
            additions = getattr(self, "carried_additions", None)
        mask, packed_seq_params = tokens.attention()
        position_ids = tokens.positions(position_ids)
        rope = interleaved_mrope_freqs if self.cfg.mrope_interleaved else mrope_freqs
        freqs = rope(position_ids.to(device), self.cfg.head_dim, self.cfg.mrope_section, self.cfg.rope_theta)

        hidden = self.decoder(hidden, attention_mask=mask, context=additions, rotary_pos_emb=freqs,
                              packed_seq_params=packed_seq_params)
        if not self.post_process:
            if additions is not None and additions.shape[-1] // hidden.shape[-1] > self.layer_range().stop:
                hidden = torch.cat([hidden, additions.to(hidden.dtype)], dim=-1)  # still needed by a later stage
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
            targets = tokens.targets(labels)  # shifted on the full sequence, then this rank's share
            if fused:
                out.per_token_loss, out.loss_mask = output_layer_lm_loss(
                    self.output_layer, hidden, weight, targets, IGNORE_INDEX)
            else:
                out.per_token_loss, out.loss_mask = vocab_parallel_lm_loss(logits, targets)
            out.loss = tokens.loss(out.per_token_loss, out.loss_mask)
            if cu_seqlens is not None:
                out.segment_ids, out.num_segments = tokens.segments(), cu_seqlens.numel() - 1
        return out
