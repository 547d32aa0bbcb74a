"""Cost balancing of media items across the ranks that share a micro-batch.

Greedy longest-processing-time (LPT): items in decreasing cost, each to the least-loaded rank
(ties: the lower item index first, the lower rank first), so every rank computes the same
assignment from the same inputs without any communication. LPT's makespan is within 4/3 of the
optimum. Costs are what each encoder declares its work per item grows with
(:meth:`mm_omni.models.common.encoder_api.ItemEncoder.item_costs`).
"""

from __future__ import annotations

from typing import Sequence


def lpt_assign(costs: Sequence[int], n_ranks: int) -> list[int]:
    """Owner rank of every item (same order as ``costs``)."""
    if n_ranks < 1:
        raise ValueError(f"n_ranks={n_ranks}: need at least one rank")
    loads = [0] * n_ranks
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(n_ranks), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


def rank_loads(costs: Sequence[int], owners: Sequence[int], n_ranks: int) -> list[int]:
    loads = [0] * n_ranks
    for cost, rank in zip(costs, owners):
        loads[rank] += cost
    return loads


def imbalance(costs: Sequence[int], owners: Sequence[int], n_ranks: int) -> float:
    """max / mean of the per-rank loads (1.0 = perfect; ``n_ranks`` = everything on one rank)."""
    loads = rank_loads(costs, owners, n_ranks)
    total = sum(loads)
    return max(loads) * n_ranks / total if total else 1.0
