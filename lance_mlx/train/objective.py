"""Upstream's training objective: flow-matching MSE on the target latents and CE on answer tokens, over a packed
full-sequence forward (no KV cache) with upstream's attention mask.

Upstream: modeling/lance/lance.py::Lance.forward (noising, velocity target, per-token losses) and
train/train_utils.py::compute_training_loss (reduction). For each target block one logit z ~ N(0, 1) is drawn
(data/dataset_base_train.py::pack_sequence), t = sigmoid(z), shifted t' = s t / (1 + (s - 1) t), x_t = t' noise +
(1 - t') x0; conditioning latents sit at t = 0, and so do the leading latent frames a first-frame-to-video sample
holds clean inside its target block (upstream's ff2v: timestep -max, left out of the MSE). MSE = sum over target
tokens of mean over channels of (llm2vae(h) - (noise - x0))^2, divided by the number of target tokens; CE = sum of
token losses (labels outside the tokenizer's vocabulary ignored) divided by the number of CE positions; loss =
mse_weight MSE + ce_weight CE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..llm import Routing
from ..sequence import Sequence as TokenSequence
from ..sequence import attention_mask

# Upstream scripts/sft_lance_*.sh (all three): TIMESTEP_SHIFT=4.0, CE_WEIGHT=0.25, MSE_WEIGHT=1.0.
TIMESTEP_SHIFT = 4.0
CE_WEIGHT = 0.25
MSE_WEIGHT = 1.0
IGNORE_INDEX = -100  # upstream Lance.forward


@dataclass
class Example:
    """One training sample: its token layout with every block's input in `split.data` (the target block holds the
    clean latents x0 (N, 48)), and for understanding samples the CE positions (index of the token that predicts
    each label, within the sample) and the labels."""

    seq: TokenSequence
    ce_index: Optional[np.ndarray] = None  # (K,) int
    labels: Optional[np.ndarray] = None  # (K,) int
    # Leading latent frames of the target held clean (t = 0, no MSE): upstream's ff2v `frame_condition_idx` [0]
    # (data/dataset_base_train.py::pack_sequence sets their timesteps to -sys.float_info.max, sigmoid -> 0).
    clean_frames: int = 0

    @property
    def target_splits(self) -> List[int]:
        return [i for i, s in enumerate(self.seq.splits) if s.attn == "noise"]


@dataclass
class Draw:
    """The random part of one step for one example: the timestep logit and noise of each target block."""

    logits: List[float]  # one z ~ N(0, 1) per target block
    noise: List[mx.array]  # (N, 48) per target block


def draw(example: Example, key: mx.array) -> Draw:
    """Upstream's draws for one example from `key` (MLX's generator; upstream's cannot be reproduced)."""
    logits, noise = [], []
    targets = example.target_splits
    keys = mx.random.split(key, 2 * max(len(targets), 1))
    for j, i in enumerate(targets):
        k1, k2 = keys[2 * j], keys[2 * j + 1]
        x0 = example.seq.splits[i].data
        logits.append(float(mx.random.normal((), key=k1).item()))
        noise.append(mx.random.normal(tuple(x0.shape), key=k2))
    return Draw(logits, noise)


def shifted_timestep(z, shift: float = TIMESTEP_SHIFT):
    """t = sigmoid(z), then upstream's shift s t / (1 + (s - 1) t) (float32, as upstream's packed_timesteps)."""
    t = mx.sigmoid(mx.array(z, dtype=mx.float32))
    return shift * t / (1 + (shift - 1) * t)


@dataclass
class Packed:
    """Examples packed into one sequence as upstream packs samples: inputs built, block-diagonal mask."""

    inputs: List[mx.array]  # (L_i, hidden) per split, in order
    positions: np.ndarray  # (3, L)
    mask: np.ndarray  # (L, L) bool
    gen_mask: np.ndarray  # (L,)
    mse_index: np.ndarray  # (M,) target-token positions
    velocity_target: Optional[mx.array]  # (M, 48) noise - x0
    ce_index: np.ndarray  # (K,)
    labels: np.ndarray  # (K,)


def _block_diag(masks: Sequence[np.ndarray]) -> np.ndarray:
    n = sum(m.shape[0] for m in masks)
    out = np.zeros((n, n), dtype=bool)
    o = 0
    for m in masks:
        k = m.shape[0]
        out[o:o + k, o:o + k] = m
        o += k
    return out


def pack(model, examples: Sequence[Example], draws: Sequence[Draw], shift: float = TIMESTEP_SHIFT) -> Packed:
    """Build the model inputs of every split (noised targets, clean conditioning latents at t = 0, ViT embeddings,
    text embeddings), positions per sample (restarting at 0), and the packed mask and loss indices."""
    inputs, positions, masks, gen, mse_idx, targets, ce_idx, labels = [], [], [], [], [], [], [], []
    offset = 0
    for ex, dr in zip(examples, draws):
        seq = ex.seq
        starts = np.cumsum([0] + seq.split_lens)
        j = 0
        for i, s in enumerate(seq.splits):
            if s.attn == "noise":
                x0 = mx.array(s.data).astype(mx.float32)
                t = shifted_timestep(dr.logits[j], shift)
                eps = dr.noise[j]
                n_clean = ex.clean_frames * s.grid[1] * s.grid[2]
                if n_clean:  # per-token times: the clean frames at 0 (x_t = x0 there)
                    t = mx.concatenate([mx.zeros((n_clean,)), mx.broadcast_to(t, (x0.shape[0] - n_clean,))])
                    x_t = t[:, None] * eps + (1 - t[:, None]) * x0
                else:
                    x_t = t * eps + (1 - t) * x0
                inputs.append(model.embed_split(s, x=x_t, t=t)[0])
                # body tokens only: the markers are text tokens (upstream's mse_loss_indexes)
                mse_idx.append(offset + starts[i] + 1 + np.arange(n_clean, len(s) - 2))
                targets.append((eps - x0)[n_clean:])
                j += 1
            else:
                inputs.append(model.embed_split(s)[0])
        positions.append(seq.position_ids())
        masks.append(attention_mask(seq.split_lens, seq.attn_modes))
        gen.append(seq.gen_mask)
        if ex.ce_index is not None:
            ce_idx.append(offset + np.asarray(ex.ce_index, dtype=np.int64))
            labels.append(np.asarray(ex.labels, dtype=np.int64))
        offset += len(seq)
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64))
    return Packed(inputs, np.concatenate(positions, axis=1), _block_diag(masks), np.concatenate(gen),
                  cat(mse_idx), mx.concatenate(targets, axis=0) if targets else None, cat(ce_idx), cat(labels))


def _layer_call(layer, h, cos, sin, routing, mask):
    return layer(h, (cos, sin), routing, None, mask)


def _checkpointed(layer, h, cos, sin, routing, mask):
    """One decoder layer under `mx.checkpoint`: its activations are recomputed in the backward pass. The layer's
    trainable parameters are explicit inputs so their gradients flow through (mlx-lm's grad_checkpoint)."""
    def inner(params, h, cos, sin, mask):
        layer.update(params)
        return _layer_call(layer, h, cos, sin, routing, mask)

    return mx.checkpoint(inner)(layer.trainable_parameters(), h, cos, sin, mask)


def hidden_states(model, packed: Packed, checkpoint: bool = False) -> mx.array:
    """(L, hidden) final-normed hidden states of the packed sequence (one full forward, upstream's mask)."""
    lm = model.language_model.model
    h = mx.concatenate(packed.inputs, axis=0)[None]  # (1, L, hidden)
    if lm.compute_dtype is not None:
        h = h.astype(lm.compute_dtype)
    cos, sin = lm.rope(packed.positions)
    routing = Routing(packed.gen_mask)
    mask = mx.array(packed.mask)[None, None]  # (1, 1, L, L), True = may attend
    for layer in lm.layers:
        h = (_checkpointed if checkpoint else _layer_call)(layer, h, cos, sin, routing, mask)
    return routing(h, lm.norm, lm.norm_moe_gen)[0]


@dataclass
class Losses:
    loss: mx.array
    mse: Optional[mx.array]
    ce: Optional[mx.array]
    mse_tokens: int
    ce_tokens: int


def losses(model, packed: Packed, vocab_limit: Optional[int] = None, checkpoint: bool = False,
           mse_weight: float = MSE_WEIGHT, ce_weight: float = CE_WEIGHT) -> Losses:
    """Upstream's loss of one packed batch. `vocab_limit` is len(tokenizer) (upstream's vocab_size_efficient): logits
    are cut there and labels at or above it are ignored."""
    h = hidden_states(model, packed, checkpoint)
    loss = mx.array(0.0)
    mse = ce = None
    m, k = len(packed.mse_index), len(packed.ce_index)
    if m:
        pred = model.llm2vae(h[mx.array(packed.mse_index.astype(np.int32))]).astype(mx.float32)
        per_token = ((pred - packed.velocity_target) ** 2).mean(axis=-1)
        mse = per_token.sum() / m
        loss = loss + mse_weight * mse
    if k:
        logits = model.language_model.lm_head(h[mx.array(packed.ce_index.astype(np.int32))]).astype(mx.float32)
        v = vocab_limit or logits.shape[-1]
        logits = logits[:, :v]
        labels = packed.labels
        valid = (labels >= 0) & (labels < v)
        safe = mx.array(np.where(valid, labels, 0).astype(np.int32))
        tok = nn.losses.cross_entropy(logits, safe, reduction="none") * mx.array(valid.astype(np.float32))
        ce = tok.sum() / k
        loss = loss + ce_weight * ce
    return Losses(loss, mse, ce, m, k)


def loss_terms(result: Losses) -> Dict[str, float]:
    out = {"loss": float(result.loss.item())}
    if result.mse is not None:
        out["mse"] = float(result.mse.item())
    if result.ce is not None:
        out["ce"] = float(result.ce.item())
    return out


def fixed_draws(examples: Sequence[Example], logits: Sequence[Sequence[float]],
                noise: Sequence[Sequence[np.ndarray]]) -> List[Draw]:
    """Draws given explicitly (parity tests, upstream comparisons)."""
    return [Draw(list(z), [mx.array(np.asarray(n, dtype=np.float32)) for n in e]) for z, e in zip(logits, noise)]


__all__ = ["Example", "Draw", "draw", "pack", "losses", "hidden_states", "shifted_timestep", "Losses",
           "fixed_draws", "loss_terms"]
