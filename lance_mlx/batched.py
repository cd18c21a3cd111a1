"""Guidance branches in one forward: their context caches padded into one stack, the noise block run as a batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, List, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .llm import KVCache, Routing

Frozen = Dict[str, object]  # the arrays a step reads but never changes (see BranchBatch.frozen)


@dataclass
class BranchBatch:
    """The guidance branches of one request as rows of one batch, in the order cond, text-dropped, text-and-vision
    dropped (lance.GenerationContext).

    Branch contexts differ in length (the text-dropped one lacks the prompt), so layer i's cached keys/values are
    stacked as (B, kv_heads, C, head_dim) with C the longest context; row b holds its own `lengths[b]` positions
    followed by zeros, which a boolean mask hides from attention. A noise token's softmax then covers exactly its
    own branch's keys: the padded slots get probability 0, the same result as a batch-1 forward up to float
    summation order. `cos`/`sin` (B, N+2, head_dim) are each row's noise-block RoPE (the noise positions of the
    text-dropped branch are those of its shortened sequence, sequence.Sequence.branch).
    """

    states: Tuple[object, ...]  # lance.BranchState of each row, for the identity check in `matches`
    lengths: List[int]
    keys: List[mx.array]
    values: List[mx.array]
    cos: mx.array
    sin: mx.array
    _frozen: Dict[int, Frozen] = field(default_factory=dict, repr=False)

    def matches(self, states: Sequence[object]) -> bool:
        return len(states) == len(self.states) and all(a is b for a, b in zip(states, self.states))

    def frozen(self, rows: int, block_len: int) -> Frozen:
        """What a step of the first `rows` branches reads: keys/values cut to the longest of those rows, their
        RoPE tables, and the padding mask (B, 1, 1, C + block_len), True = may attend; no mask when no row is
        padded (e.g. the conditional branch alone)."""
        if rows not in self._frozen:
            lens = self.lengths[:rows]
            c = max(lens)
            out: Frozen = {"keys": [k[:rows, :, :c] for k in self.keys],
                           "values": [v[:rows, :, :c] for v in self.values],
                           "cos": self.cos[:rows], "sin": self.sin[:rows]}
            if min(lens) < c:
                j = np.arange(c + block_len)[None, :]
                keep = (j < np.asarray(lens)[:, None]) | (j >= c)  # own context, then the whole noise block
                out["mask"] = mx.array(keep[:, None, None, :])
            self._frozen[rows] = out
        return self._frozen[rows]


def _padded(a: mx.array, length: int) -> mx.array:
    return a if a.shape[2] == length else mx.pad(a, [(0, 0), (0, 0), (0, length - a.shape[2]), (0, 0)])


def stack_branches(states: Sequence[object]) -> BranchBatch:
    """Stack the prefilled caches and noise RoPE of `states` (lance.BranchState, batch 1 each) into a BranchBatch.

    Afterwards each branch's own KVCache reads its row of the stack (a view, no copy), so the single-branch path
    (lance.Lance.noise_query) keeps working and the context is held in memory once. Stacked one layer at a time so
    the extra memory while stacking is one layer's worth.
    """
    lengths = [s.cache[0].offset for s in states]
    if min(lengths) < 1:
        raise ValueError("every guidance branch needs a prefilled context to be batched")
    c = max(lengths)
    keys, values = [], []
    for layer in range(len(states[0].cache)):
        caches = [s.cache[layer] for s in states]
        k = mx.concatenate([_padded(kv.state[0], c) for kv in caches], axis=0)  # (B, kv_heads, C, head_dim)
        v = mx.concatenate([_padded(kv.state[1], c) for kv in caches], axis=0)
        mx.eval(k, v)
        for b, kv in enumerate(caches):
            kv.keys, kv.values = k[b:b + 1, :, :lengths[b]], v[b:b + 1, :, :lengths[b]]
            kv.offset = lengths[b]
            mx.eval(kv.keys, kv.values)
        keys.append(k)
        values.append(v)
    cos = mx.stack([s.rope[0] for s in states])  # (B, N+2, head_dim)
    sin = mx.stack([s.rope[1] for s in states])
    mx.eval(cos, sin)
    return BranchBatch(tuple(states), lengths, keys, values, cos, sin)


def _frozen_cache(keys: mx.array, values: mx.array) -> KVCache:
    """A KVCache that only serves reads of the given keys/values (the noise query never writes)."""
    c = KVCache()
    c.keys, c.values, c.offset = keys, values, keys.shape[2]
    return c


def noise_block_velocities(model, routing: Routing, x: mx.array, t: mx.array, frozen: Frozen) -> mx.array:
    """(B, N, 48) float32 velocities of the noise block at latents x (N, 48), time t (scalar or (N,)) for the B
    branch rows of `frozen`. The block's inputs are the same in every branch; only the cache and the RoPE differ.

    A pure function of its array arguments (and the model's weights), so `mx.compile` can trace it.
    """
    body = model.embed_latents(x, t, None, frozen["pos_rows"])  # (N, hidden)
    markers = frozen["markers"]
    h = mx.concatenate([markers[:1], body, markers[1:]], axis=0)[None]  # (1, N+2, hidden)
    rows = frozen["cos"].shape[0]
    h = mx.broadcast_to(h, (rows,) + h.shape[1:])  # (B, N+2, hidden)
    cache = [_frozen_cache(k, v) for k, v in zip(frozen["keys"], frozen["values"])]
    out = model.language_model.model(h, rope=(frozen["cos"], frozen["sin"]), routing=routing, cache=cache,
                                     attn=frozen.get("mask", "full"), update_cache=False)
    return model.llm2vae(out[:, 1:-1]).astype(mx.float32)  # (B, N, 48)


class BatchedNoiseStep:
    """The per-step noise-block forward of one request's guidance branches, batched and (optionally) compiled.

    One compiled function per batch size (1 outside the guidance interval, 2 or 3 inside), each traced on its
    first call and reused for every later step of the request: the latent grid, the context lengths and the
    dtype are fixed for a request. A new request (GenerationContext) traces anew. The model's weights are read
    through `mx.compile(inputs=model.state)`, so weights loaded or quantized later are seen, never baked in.
    """

    def __init__(self, model, routing: Routing, states: Sequence[object], markers: mx.array, pos_rows: mx.array):
        self.batch = stack_branches(states)
        self.extra = {"markers": markers, "pos_rows": pos_rows}
        self.block_len = int(pos_rows.shape[0]) + 2
        self._forward: Callable = partial(noise_block_velocities, model, routing)
        self._state = model.state
        self._compiled: Dict[int, Callable] = {}

    def __call__(self, x: mx.array, t, rows: int, compiled: bool = True) -> mx.array:
        """(rows, N, 48) velocities of the first `rows` branches."""
        frozen = dict(self.batch.frozen(rows, self.block_len), **self.extra)
        t = t if isinstance(t, mx.array) else mx.array(t, dtype=mx.float32)  # an array: no retrace per step
        if not compiled:
            return self._forward(x, t, frozen)
        if rows not in self._compiled:
            self._compiled[rows] = mx.compile(self._forward, inputs=self._state)
        return self._compiled[rows](x, t, frozen)
