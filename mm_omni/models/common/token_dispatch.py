"""Token dispatch without a host sync when every expert of a mixture-of-experts layer lives on this rank.

megatron's token dispatchers serve expert and tensor parallelism. With one expert-parallel rank and no expert
tensor parallelism (EP=1, expert TP=1: all experts local) they still, in every MoE layer, copy the per-expert
token counts to the host (a device sync: the host waits for the GPU instead of queueing the next kernels
ahead of it), select the routed tokens with ``masked_select`` (another sync: its output size is read back),
and "sort the tokens by local expert" by splitting them into one chunk per expert and concatenating the chunks
again, an identity with one rank (forward and backward). On a 128-expert layer these leave the GPU idle for
most of the layer.

:class:`LocalTokenDispatcher` makes the same permutation with none of that: each token's ``k`` experts are the
``True`` entries of the router's map, so the permuted tokens are exactly ``tokens x k`` (dropless top-k),
ordered by expert and then by token (a stable sort of the transposed map, megatron's order), and the counts
stay on the device for the experts' grouped GEMM. The combine is megatron's ``unpermute``. Results equal
megatron's dispatchers (bit for bit on the CPU). :class:`MoELayer` (megatron's, with this dispatcher where it
applies: :func:`local_dispatch_applies`) is what the decoder builds; with EP or expert TP > 1, token dropping,
quantization padding or an overlapped shared expert it keeps megatron's dispatcher.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe import moe_layer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection, unpermute
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher


def local_dispatch_applies(config, dispatcher: MoETokenDispatcher) -> bool:
    """Every expert on this rank and every token routed to exactly ``moe_router_topk`` experts."""
    return (dispatcher.ep_size == 1 and dispatcher.tp_size == 1
            and config.moe_token_dispatcher_type in ("allgather", "alltoall")
            and config.moe_expert_capacity_factor is None
            and not getattr(config, "moe_router_padding_for_quantization", False)
            and not getattr(config, "moe_router_padding_for_fp8", False)
            and not config.moe_shared_expert_overlap and not config.moe_permute_fusion)


class LocalTokenDispatcher(MoETokenDispatcher):
    """megatron's dispatcher interface for all experts local: a permutation by expert, no communication."""

    def __init__(self, config, pg_collection):
        super().__init__(config=config, pg_collection=pg_collection)
        self.topk = config.moe_router_topk

    def dispatch_preprocess(self, tokens: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        self.hidden_shape = tokens.shape
        self.routing_map = routing_map
        tokens = tokens.view(-1, tokens.shape[-1])
        self.flat_shape = tokens.shape
        num_tokens = tokens.shape[0]
        # the (expert, token) pairs of the map, by expert then token: the True entries come first in a stable
        # ascending sort of "not routed", and there are num_tokens * topk of them
        pairs = torch.argsort((~routing_map.T.reshape(-1)).to(torch.uint8), stable=True)[:num_tokens * self.topk]
        self.token_index = pairs % num_tokens
        self.tokens_per_expert = routing_map.sum(dim=0)
        permuted_probs = probs.T.reshape(-1).index_select(0, pairs)
        return tokens.index_select(0, self.token_index), permuted_probs

    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        return hidden_states, probs

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        tokens_per_expert, self.tokens_per_expert = self.tokens_per_expert, None
        return hidden_states, tokens_per_expert, probs

    def combine_preprocess(self, hidden_states: torch.Tensor):
        return hidden_states

    def token_combine(self, hidden_states: torch.Tensor):
        return hidden_states

    def combine_postprocess(self, hidden_states: torch.Tensor):
        out = unpermute(hidden_states, self.token_index, restore_shape=self.flat_shape, fused=False)
        return out.view(self.hidden_shape)


class MoELayer(moe_layer.MoELayer):
    """megatron's ``MoELayer``, its token dispatcher replaced by :class:`LocalTokenDispatcher` where that applies."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, **kwargs):
        super().__init__(config, submodules, layer_number=layer_number, pg_collection=pg_collection, **kwargs)
        if local_dispatch_applies(self.config, self.token_dispatcher):
            self.token_dispatcher = LocalTokenDispatcher(self.config, pg_collection or get_default_pg_collection())
