"""Sequence-parallel noise block: each rank runs a contiguous shard of its tokens, keys/values exchanged per layer."""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .llm import Routing, apply_rope

Bounds = List[Tuple[int, int]]


def shard_bounds(length: int, shards: int) -> Bounds:
    """[start, stop) of `shards` contiguous pieces of `length` tokens; the first `length % shards` get one more."""
    if shards < 1 or length < shards:
        raise ValueError(f"cannot split {length} tokens over {shards} shards")
    base, extra = divmod(length, shards)
    stops = np.cumsum([base + (s < extra) for s in range(shards)])
    return [(int(b - (base + (s < extra))), int(b)) for s, b in enumerate(stops)]


def latent_bounds(bounds: Bounds, block_len: int) -> Bounds:
    """Latent rows [a, b) (0..N) of each shard of a noise block (VS marker, N latents, VE marker)."""
    return [(max(a, 1) - 1, max(min(b, block_len - 1) - 1, max(a, 1) - 1)) for a, b in bounds]


def assemble(gathered: mx.array, rows: Sequence[int], bounds: Bounds) -> mx.array:
    """Concatenate the valid rows of padded pieces: piece s is `gathered[rows[s]]`, `bounds[s]` its [a, b)."""
    parts = [gathered[r, :b - a] for r, (a, b) in zip(rows, bounds) if b > a]
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)


def pad_rows(x: mx.array, rows: int) -> mx.array:
    """(n, C) -> (rows, C) with zero rows appended (every rank sends pieces of one shape)."""
    n = x.shape[0]
    if n == rows:
        return x
    return mx.concatenate([x, mx.zeros((rows - n,) + x.shape[1:], dtype=x.dtype)], axis=0)


class ShardedNoiseBlock:
    """The noise block forward of one rank: its shard of tokens, for each of its guidance branches (slots).

    Per decoder layer every rank computes q/k/v of its tokens (RoPE applied), all ranks all-gather the keys/values
    of every shard (one collective per layer, all slots together), and each rank attends its queries over its
    branch's context cache followed by the whole gathered block, then runs o_proj and the MLP on its tokens. The
    arithmetic is that of llm.Qwen2MoTDecoderLayer / PackedAttentionMoT.attend with attn="full", row by row.
    """

    def __init__(self, lm, gen_mask: np.ndarray, bounds: Bounds, shard: int):
        self.lm = lm  # llm.Qwen2Model
        self.bounds, self.shard = bounds, shard
        self.start, self.stop = bounds[shard]
        self.pad = max(b - a for a, b in bounds)
        self.routing = Routing(np.asarray(gen_mask, dtype=bool)[self.start:self.stop])

    def _qkv(self, layer, x: mx.array, rope) -> Tuple[mx.array, mx.array]:
        """Queries (1, Ls, H, D) and packed keys/values (Ls, 2*Hkv*D) of this shard, RoPE applied."""
        attn = layer.self_attn
        q, k, v = self.routing(x, lambda t: attn.project(layer.input_layernorm(t), gen=False),
                               lambda t: attn.project(layer.input_layernorm_moe_gen(t), gen=True))
        cos, sin = rope[0][self.start:self.stop], rope[1][self.start:self.stop]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (1, Ls, H, D), (1, Ls, Hkv, D)
        kv = mx.concatenate([k.reshape(k.shape[1], -1), v.reshape(v.shape[1], -1)], axis=1)  # (Ls, 2*Hkv*D)
        return q, kv

    def __call__(self, h_in: mx.array, states: Sequence[Optional[object]], exchange,
                 shard_rows: Callable[[int], List[int]]) -> List[Optional[mx.array]]:
        """Final-normed hidden states (1, Ls, hidden) of this rank's shard for each slot's `BranchState` (None for
        an empty slot, which still takes part in every exchange with zeros). `h_in` is the whole (1, L, hidden)
        block input; `exchange.gather` is the one collective; `shard_rows(j)` are the rows of a gathered array
        holding slot j of each shard of this rank's branch group, in shard order."""
        lm = self.lm
        attn0 = lm.layers[0].self_attn
        width = 2 * attn0.n_kv_heads * attn0.head_dim
        hs = [None if st is None else h_in[:, self.start:self.stop] for st in states]
        for i, layer in enumerate(lm.layers):
            attn = layer.self_attn
            qs, kvs = [], []
            for h, st in zip(hs, states):
                if st is None:
                    qs.append(None)
                    kvs.append(mx.zeros((self.pad, width), dtype=h_in.dtype))
                    continue
                q, kv = self._qkv(layer, h, st.rope)
                qs.append(q)
                kvs.append(pad_rows(kv, self.pad))
            gathered = exchange.gather(mx.stack(kvs), f"layer {i} keys/values")  # (R * slots, pad, width)
            for j, (h, q, st) in enumerate(zip(hs, qs, states)):
                if st is None:
                    continue
                kv = assemble(gathered, shard_rows(j), self.bounds)  # (L, width)
                L = kv.shape[0]
                k = kv[:, :width // 2].reshape(1, L, attn.n_kv_heads, attn.head_dim).transpose(0, 2, 1, 3)
                v = kv[:, width // 2:].reshape(1, L, attn.n_kv_heads, attn.head_dim).transpose(0, 2, 1, 3)
                keys, values = st.cache[i].fetch_with(k, v)  # context cache, then the whole block
                o = mx.fast.scaled_dot_product_attention(q.transpose(0, 2, 1, 3), keys, values, scale=attn.scale)
                o = o.transpose(0, 2, 1, 3).reshape(1, q.shape[1], -1)  # (1, Ls, H*D)
                h = h + self.routing(o, attn.o_proj, attn.o_proj_moe_gen)
                hs[j] = h + self.routing(h, lambda t: layer.mlp(layer.post_attention_layernorm(t)),
                                         lambda t: layer.mlp_moe_gen(layer.post_attention_layernorm_moe_gen(t)))
        return [None if h is None else self.routing(h, lm.norm, lm.norm_moe_gen) for h in hs]

    def latent_slice(self, block_len: int) -> Tuple[int, int]:
        """Rows of this shard's output that are latent tokens (markers dropped)."""
        lo = max(self.start, 1) - self.start
        hi = max(min(self.stop, block_len - 1) - self.start, lo)
        return lo, hi
