"""Guidance branches in one forward: the noise block run as a batch, each row attending to its own branch's cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from .llm import KVCache, Routing, RowCaches

Frozen = Dict[str, object]  # the arrays a step reads but never changes (see BranchBatch.frozen)


@dataclass
class BranchBatch:
    """The guidance branches of one request as rows of one batch, in the order cond, text-dropped, text-and-vision
    dropped (lance.GenerationContext).

    Branch contexts differ in length (the text-dropped one lacks the prompt). Each row keeps its own cache,
    unpadded: in every layer the projections and MLPs run on the whole batch, and attention runs row by row over
    that row's context followed by the noise block (llm.RowCaches), so a noise token's softmax covers exactly its
    own branch's keys with no mask. `cos`/`sin` (B, N+2, head_dim) are each row's noise-block RoPE (the noise
    positions of the text-dropped branch are those of its shortened sequence, sequence.Sequence.branch).

    A context may be empty: without the chat template (upstream's text_template false) the whole context is the
    prompt, so the text-dropped branch caches nothing and its noise block attends to itself only.
    """

    states: Tuple[object, ...]  # lance.BranchState of each row
    cos: mx.array
    sin: mx.array
    _frozen: Dict[int, Frozen] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, states: Sequence[object]) -> "BranchBatch":
        """The rows of `states` (lance.BranchState, prefilled, batch 1 each, a context possibly empty); their caches
        are read, never copied."""
        cos = mx.stack([s.rope[0] for s in states])  # (B, N+2, head_dim)
        sin = mx.stack([s.rope[1] for s in states])
        mx.eval(cos, sin)
        return cls(tuple(states), cos, sin)

    @property
    def lengths(self) -> List[int]:
        return [s.cache[0].offset for s in self.states]

    def matches(self, states: Sequence[object]) -> bool:
        return len(states) == len(self.states) and all(a is b for a, b in zip(states, self.states))

    def frozen(self, rows: int) -> Frozen:
        """What a step of the first `rows` branches reads: per layer, each row's cached keys and values (None for
        an empty context), and the rows' RoPE tables."""
        if rows not in self._frozen:
            caches = [s.cache for s in self.states[:rows]]
            self._frozen[rows] = {"keys": [[c[i].state[0] for c in caches] for i in range(len(caches[0]))],
                                  "values": [[c[i].state[1] for c in caches] for i in range(len(caches[0]))],
                                  "cos": self.cos[:rows], "sin": self.sin[:rows]}
        return self._frozen[rows]


def _frozen_cache(keys: Optional[mx.array], values: Optional[mx.array]) -> KVCache:
    """A KVCache that only serves reads of the given keys/values (the noise query never writes); None: an empty
    one, whose reads return the block alone (KVCache.fetch_with)."""
    c = KVCache()
    if keys is not None:
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
    cache = [RowCaches([_frozen_cache(k, v) for k, v in zip(ks, vs)])
             for ks, vs in zip(frozen["keys"], frozen["values"])]
    out = model.language_model.model(h, rope=(frozen["cos"], frozen["sin"]), routing=routing, cache=cache,
                                     attn="full", update_cache=False)
    return model.llm2vae(out[:, 1:-1]).astype(mx.float32)  # (B, N, 48)


class BatchedNoiseStep:
    """The per-step noise-block forward of one request's guidance branches, batched and (optionally) compiled.

    One compiled function per batch size (1 outside the guidance interval, 2 or 3 inside), each traced on its
    first call and reused for every later step of the request: the latent grid, the context lengths and the
    dtype are fixed for a request. A new request (GenerationContext) traces anew. The model's weights are read
    through `mx.compile(inputs=model.state)`, so weights loaded or quantized later are seen, never baked in.
    """

    def __init__(self, model, routing: Routing, states: Sequence[object], markers: mx.array, pos_rows: mx.array):
        self.batch = BranchBatch.of(states)
        self.extra = {"markers": markers, "pos_rows": pos_rows}
        self._forward: Callable = partial(noise_block_velocities, model, routing)
        self._state = model.state
        self._compiled: Dict[int, Callable] = {}

    def __call__(self, x: mx.array, t, rows: int, compiled: bool = True) -> mx.array:
        """(rows, N, 48) velocities of the first `rows` branches."""
        frozen = dict(self.batch.frozen(rows), **self.extra)
        t = t if isinstance(t, mx.array) else mx.array(t, dtype=mx.float32)  # an array: no retrace per step
        if not compiled:
            return self._forward(x, t, frozen)
        if rows not in self._compiled:
            self._compiled[rows] = mx.compile(self._forward, inputs=self._state)
        return self._compiled[rows](x, t, frozen)
