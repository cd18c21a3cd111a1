"""Qwen2 Mixture-of-Transformers text tower of Lance: per-token und/gen experts, 3-D mRoPE, KV cache."""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import LLMConfig

Rope = Tuple[mx.array, mx.array]  # (cos, sin), each (L, head_dim) or per row (B, L, head_dim), float32


# ---------------------------------------------------------------------------------------------------------------
class KVCache:
    """Keys/values of one layer, (B, n_kv_heads, T, head_dim), grown in steps; `offset` = valid length."""

    step = 256

    def __init__(self):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Append (B, H, L, D) keys/values and return everything cached so far."""
        prev, n = self.offset, keys.shape[2]
        if self.keys is None or prev + n > self.keys.shape[2]:
            B, H, _, D = keys.shape
            grow = ((n + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, H, grow, D), dtype=keys.dtype)
            new_v = mx.zeros((B, H, grow, values.shape[3]), dtype=values.dtype)
            if self.keys is not None:
                new_k = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                new_v = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
            self.keys, self.values = new_k, new_v
        self.offset += n
        self.keys[..., prev:self.offset, :] = keys
        self.values[..., prev:self.offset, :] = values
        return self.keys[..., :self.offset, :], self.values[..., :self.offset, :]

    def fetch_with(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Cached keys/values followed by `keys`/`values`, without writing them (query mode)."""
        if self.offset == 0:
            return keys, values
        return (mx.concatenate([self.keys[..., :self.offset, :], keys], axis=2),
                mx.concatenate([self.values[..., :self.offset, :], values], axis=2))

    @property
    def state(self) -> Tuple[Optional[mx.array], Optional[mx.array]]:
        if self.keys is None:
            return None, None
        return self.keys[..., :self.offset, :], self.values[..., :self.offset, :]

    def trim(self, n: int) -> int:
        """Drop the last `n` positions; returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    def copy(self) -> "KVCache":
        c = KVCache()
        if self.keys is not None:
            c.keys, c.values = self.state
            c.offset = self.offset
        return c


class RowCaches:
    """One layer's read-only caches of a batch whose rows have contexts of different lengths (the guidance branches
    of one request, lance_mlx/batched.py). Each row attends to its own cache followed by its own block, unpadded,
    so no mask is needed and attention stays the fused kernel; the projections around it still run batched."""

    def __init__(self, rows: Sequence[KVCache]):
        self.rows = list(rows)

    def attend(self, q: mx.array, k: mx.array, v: mx.array, scale: float, attn, update_cache: bool) -> mx.array:
        """q (B, H, L, D), k/v (B, Hkv, L, D) after RoPE -> (B, L, H*D), bidirectional over cache + block."""
        if update_cache or attn != "full":
            raise ValueError("RowCaches serve the read-only, bidirectional noise query only")
        B, _, L, _ = q.shape
        o = mx.concatenate([mx.fast.scaled_dot_product_attention(q[b:b + 1], *c.fetch_with(k[b:b + 1], v[b:b + 1]),
                                                                 scale=scale)
                            for b, c in enumerate(self.rows)], axis=0)
        return o.transpose(0, 2, 1, 3).reshape(B, L, -1)


def make_cache(num_layers: int) -> List[KVCache]:
    return [KVCache() for _ in range(num_layers)]


def cache_arrays(cache: Sequence[KVCache]) -> List[mx.array]:
    """The arrays to `mx.eval` after a prefill."""
    return [a for c in cache for a in c.state if a is not None]


# ---------------------------------------------------------------------------------------------------------------
class Routing:
    """Host-side expert assignment of a block of tokens (False = und, True = gen).

    Each expert runs once per call, on its own tokens only (so its weights are read once): contiguous runs are
    sliced (a noise block is und, gen..., und: the two markers go through the und expert together) and the
    outputs are put back in order; masks with many runs use gather / inverse-permutation instead.
    """

    max_segments = 8

    def __init__(self, gen_mask: Union[None, np.ndarray, Sequence[bool]] = None):
        m = np.zeros(0, dtype=bool) if gen_mask is None else np.asarray(gen_mask, dtype=bool).reshape(-1)
        self.gen_mask = m
        if not m.any():
            self.kind = "und"
            return
        if m.all():
            self.kind = "gen"
            return
        edges = np.flatnonzero(np.diff(m.astype(np.int8))) + 1
        bounds = [0] + edges.tolist() + [len(m)]
        segments = [(a, b, bool(m[a])) for a, b in zip(bounds[:-1], bounds[1:])]
        if len(segments) <= self.max_segments:
            self.kind = "segments"
            self.runs = {g: [(a, b) for a, b, gg in segments if gg == g] for g in (False, True)}
            # where each segment's output sits inside its expert's output
            offs, self.parts = {False: 0, True: 0}, []
            for a, b, g in segments:
                self.parts.append((g, offs[g], offs[g] + b - a))
                offs[g] += b - a
        else:
            und_idx, gen_idx = np.flatnonzero(~m), np.flatnonzero(m)
            self.kind = "gather"
            self.und_idx = mx.array(und_idx.astype(np.int32))
            self.gen_idx = mx.array(gen_idx.astype(np.int32))
            # positions of the original tokens in concat([und, gen])
            self.inverse = mx.array(np.argsort(np.concatenate([und_idx, gen_idx])).astype(np.int32))

    @classmethod
    def und(cls) -> "Routing":
        return cls(None)

    @classmethod
    def gen(cls, length: int) -> "Routing":
        return cls(np.ones(length, dtype=bool))

    def __call__(self, x: mx.array, f_und: Callable, f_gen: Callable):
        """Apply f_und / f_gen on the token axis (axis 1) of x; f may return an array or a tuple of arrays."""
        if self.kind == "und":
            return f_und(x)
        if self.kind == "gen":
            return f_gen(x)
        if self.kind == "segments":
            y = {}
            for g, f in ((False, f_und), (True, f_gen)):
                runs = self.runs[g]
                xs = x[:, runs[0][0]:runs[0][1]] if len(runs) == 1 else \
                    mx.concatenate([x[:, a:b] for a, b in runs], axis=1)
                y[g] = f(xs)
            if isinstance(y[False], tuple):
                return tuple(mx.concatenate([y[g][i][:, a:b] for g, a, b in self.parts], axis=1)
                             for i in range(len(y[False])))
            return mx.concatenate([y[g][:, a:b] for g, a, b in self.parts], axis=1)
        yu, yg = f_und(mx.take(x, self.und_idx, axis=1)), f_gen(mx.take(x, self.gen_idx, axis=1))
        if isinstance(yu, tuple):
            return tuple(mx.take(mx.concatenate([a, b], axis=1), self.inverse, axis=1) for a, b in zip(yu, yg))
        return mx.take(mx.concatenate([yu, yg], axis=1), self.inverse, axis=1)


# ---------------------------------------------------------------------------------------------------------------
def rope_inv_freq(head_dim: int, theta: float, bf16: bool = False) -> np.ndarray:
    """theta^(-2j/head_dim), j < head_dim/2 (float32). With bf16=True the values are rounded to bfloat16 as the
    buffer of upstream's bf16-cast model is (inference_lance.py casts with `.to(bfloat16)`;
    modeling/qwen2_5_vl/modeling_qwen2_5_vl.py::Qwen2_5_VLRotaryEmbedding); the default keeps float32."""
    inv = (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim)))
    inv = inv.astype(np.float32)
    if bf16:
        inv = np.array(mx.array(inv).astype(mx.bfloat16).astype(mx.float32))
    return inv


def mrope_cos_sin(position_ids: Union[mx.array, np.ndarray], inv_freq: np.ndarray,
                  mrope_section: Sequence[int]) -> Rope:
    """cos/sin (L, head_dim) float32 of multimodal RoPE for (3, L) positions (t, h, w).

    Frequency j takes the angle of axis a(j) with sections [t, h, w] over the first head_dim/2 frequencies, and
    the rotate-half layout repeats them (upstream modeling_qwen2_5_vl.py::apply_multimodal_rotary_pos_emb).
    """
    axis = np.repeat(np.arange(3), list(mrope_section))  # (head_dim/2,)
    if len(axis) != len(inv_freq):
        raise ValueError(f"mrope sections {list(mrope_section)} do not cover head_dim/2 = {len(inv_freq)}")
    pos = mx.array(position_ids).astype(mx.float32)  # (3, L)
    freqs = pos[mx.array(axis)].T * mx.array(inv_freq)  # (L, head_dim/2)
    emb = mx.concatenate([freqs, freqs], axis=-1)  # (L, head_dim)
    return mx.cos(emb), mx.sin(emb)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x (B, L, H, D) rotated in float32 with rotate_half([a, b]) = [-b, a]; returns x's dtype.

    cos/sin are (L, D), shared by every row, or (B, L, D), one table per row (guidance branches batched
    together have their own noise-block positions, lance_mlx/batched.py)."""
    xf = x.astype(mx.float32)
    half = x.shape[-1] // 2
    rot = mx.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads
    out = xf * cos + rot * sin
    return out.astype(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class PackedAttentionMoT(nn.Module):
    """GQA self-attention with und projections/norms and their `_moe_gen` copies (qwen2_navit.py)."""

    def __init__(self, args: LLMConfig):
        super().__init__()
        dim, hd = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, hd
        self.scale = hd ** -0.5
        self.q_proj = nn.Linear(dim, self.n_heads * hd, bias=True)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=True)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=True)
        self.o_proj = nn.Linear(self.n_heads * hd, dim, bias=False)
        self.q_proj_moe_gen = nn.Linear(dim, self.n_heads * hd, bias=True)
        self.k_proj_moe_gen = nn.Linear(dim, self.n_kv_heads * hd, bias=True)
        self.v_proj_moe_gen = nn.Linear(dim, self.n_kv_heads * hd, bias=True)
        self.o_proj_moe_gen = nn.Linear(self.n_heads * hd, dim, bias=False)
        # Lance runs with per-head q/k RMSNorm in both experts (inference_lance.sh --llm_qk_norm true)
        self.qk_norm = getattr(args, "qk_norm", True)
        if self.qk_norm:
            self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
            self.q_norm_moe_gen = nn.RMSNorm(hd, eps=args.rms_norm_eps)
            self.k_norm_moe_gen = nn.RMSNorm(hd, eps=args.rms_norm_eps)

    def project(self, x: mx.array, gen: bool) -> Tuple[mx.array, mx.array, mx.array]:
        """q, k, v of one expert, (B, L, heads, head_dim), q/k normalized per head (before RoPE)."""
        B, L, _ = x.shape
        sfx = "_moe_gen" if gen else ""
        q = self[f"q_proj{sfx}"](x).reshape(B, L, self.n_heads, self.head_dim)  # (B, L, H, D)
        k = self[f"k_proj{sfx}"](x).reshape(B, L, self.n_kv_heads, self.head_dim)  # (B, L, Hkv, D)
        v = self[f"v_proj{sfx}"](x).reshape(B, L, self.n_kv_heads, self.head_dim)  # (B, L, Hkv, D)
        if self.qk_norm:
            q, k = self[f"q_norm{sfx}"](q), self[f"k_norm{sfx}"](k)
        return q, k, v

    def attend(self, q, k, v, rope: Rope, cache: Union[KVCache, "RowCaches", None], attn,
               update_cache: bool) -> mx.array:
        """RoPE + scaled dot-product attention; returns (B, L, heads * head_dim) before o_proj.

        attn: "causal" (over cache + block, lower-right aligned), "full" (bidirectional over cache + block) or a
        boolean mask array broadcastable to (B, heads, L, T) (True = may attend). A `RowCaches` cache gives each
        row of the batch its own context.
        """
        B, L = q.shape[:2]
        cos, sin = rope
        q = apply_rope(q, cos, sin).transpose(0, 2, 1, 3)  # (B, H, L, D)
        k = apply_rope(k, cos, sin).transpose(0, 2, 1, 3)  # (B, Hkv, L, D)
        v = v.transpose(0, 2, 1, 3)
        if isinstance(cache, RowCaches):
            return cache.attend(q, k, v, self.scale, attn, update_cache)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v) if update_cache else cache.fetch_with(k, v)
        if isinstance(attn, str):
            if attn not in ("causal", "full"):
                raise ValueError(f"attn must be 'causal', 'full' or a mask array, got {attn!r}")
            mask = "causal" if (attn == "causal" and L > 1) else None
        else:
            mask = attn
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return o.transpose(0, 2, 1, 3).reshape(B, L, -1)  # (B, L, H*D)


class Qwen2MoTDecoderLayer(nn.Module):
    def __init__(self, args: LLMConfig):
        super().__init__()
        dim, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = PackedAttentionMoT(args)
        self.mlp = MLP(dim, args.intermediate_size)
        self.mlp_moe_gen = MLP(dim, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(dim, eps=eps)
        self.input_layernorm_moe_gen = nn.RMSNorm(dim, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(dim, eps=eps)
        self.post_attention_layernorm_moe_gen = nn.RMSNorm(dim, eps=eps)

    def _qkv_und(self, x):
        return self.self_attn.project(self.input_layernorm(x), gen=False)

    def _qkv_gen(self, x):
        return self.self_attn.project(self.input_layernorm_moe_gen(x), gen=True)

    def _mlp_und(self, x):
        return self.mlp(self.post_attention_layernorm(x))

    def _mlp_gen(self, x):
        return self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(x))

    def __call__(self, x: mx.array, rope: Rope, routing: Routing, cache: Union[KVCache, "RowCaches", None] = None,
                 attn="causal", update_cache: bool = True) -> mx.array:
        q, k, v = routing(x, self._qkv_und, self._qkv_gen)
        o = self.self_attn.attend(q, k, v, rope, cache, attn, update_cache)
        h = x + routing(o, self.self_attn.o_proj, self.self_attn.o_proj_moe_gen)
        return h + routing(h, self._mlp_und, self._mlp_gen)


class Qwen2Model(nn.Module):
    """Embeddings, MoT decoder layers, und/gen final norms."""

    def __init__(self, args: LLMConfig):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Qwen2MoTDecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.norm_moe_gen = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        # Not a parameter (plain numpy attribute); set `rope_bf16_inv_freq = True` to round the frequencies like
        # upstream's bf16-cast buffer.
        self.rope_bf16_inv_freq = False
        # Not a parameter: the dtype the hidden states are cast to on entry (None: the embeddings' dtype, i.e. the
        # weights'); float32 over bfloat16 weights promotes every matmul to float32 (Lance.compute_dtype).
        self.compute_dtype: Optional[mx.Dtype] = None

    def rope(self, position_ids) -> Rope:
        """cos/sin for (3, L) positions (float32, shared by all layers)."""
        a = self.args
        return mrope_cos_sin(position_ids, rope_inv_freq(a.head_dim, a.rope_theta, self.rope_bf16_inv_freq),
                             a.mrope_section)

    def __call__(self, h: mx.array, position_ids=None, *, rope: Optional[Rope] = None,
                 routing: Optional[Routing] = None, cache: Optional[Sequence[KVCache]] = None,
                 attn="causal", update_cache: bool = True) -> mx.array:
        """Hidden states (B, L, hidden) -> final-normed hidden states (B, L, hidden).

        attn: "causal" / "full" against cache + block, or a boolean mask array; update_cache=False attends to
        cache + block without writing the block (the per-step noise query).
        """
        if rope is None:
            rope = self.rope(position_ids)
        if self.compute_dtype is not None:
            h = h.astype(self.compute_dtype)
        routing = routing or Routing.und()
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, routing, None if cache is None else cache[i], attn, update_cache)
        return routing(h, self.norm, self.norm_moe_gen)


class Qwen2ForCausalLM(nn.Module):
    """`language_model`: `.model` and an untied `.lm_head` (upstream runs with tie_word_embeddings false)."""

    def __init__(self, args: LLMConfig):
        super().__init__()
        self.args = args
        self.model = Qwen2Model(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def make_cache(self) -> List[KVCache]:
        return make_cache(self.args.num_hidden_layers)

    def __call__(self, input_ids, position_ids=None, cache: Optional[Sequence[KVCache]] = None,
                 attn="causal") -> mx.array:
        """Text-only forward (und expert): logits (B, L, vocab). Positions default to cache offset + arange."""
        ids = mx.array(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if position_ids is None:
            start = cache[0].offset if cache else 0
            position_ids = text_positions(start, ids.shape[1])
        h = self.model(self.model.embed_tokens(ids), position_ids, cache=cache, attn=attn)
        return self.lm_head(h)


def text_positions(start: int, length: int) -> np.ndarray:
    """(3, length) positions of plain text continuing at `start` (all three axes equal)."""
    return np.broadcast_to(np.arange(start, start + length, dtype=np.int64), (3, length)).copy()
