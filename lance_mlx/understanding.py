"""Image and video understanding (x2t): upstream's prompt layout, ViT scatter, KV-cached greedy or sampled decoding."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, List, Optional, Tuple
from typing import Sequence as Seq

import mlx.core as mx
import numpy as np

from .config import IM_END, IM_START, IMAGE_PAD, MAX_ANSWER_TOKENS, NEWLINE, VIDEO_PAD, VISION_END, VISION_START
from .errors import InvalidRequestError, WeightsError
from .llm import KVCache, text_positions
from .sequence import (
    ASSISTANT,
    QA_SYSTEM_PROMPTS,
    Sequence,
    Split,
    attention_mask,
    caption_system_prompts,
    get_rope_index,
    text_split,
    vit_split,
)

MAX_TOKENS = MAX_ANSWER_TOKENS  # upstream inference_lance.py: MAX_GENERATION_LENGTH = 256, greedy


def system_prompt(vision_type: str = "image", question: Optional[str] = None, caption_index: int = 0) -> str:
    """The system prompt of an x2t request.

    With a question: the QA prompt of upstream's example files. Without one: a caption prompt. Upstream draws one
    of its four caption prompts at random (data/common.py::generate_system_prompt); we take `caption_index`
    (default 0, "Generate a detailed and accurate description ...") so a run is reproducible.
    """
    if vision_type not in QA_SYSTEM_PROMPTS:
        raise InvalidRequestError(f"vision_type must be 'image' or 'video', got {vision_type!r}")
    if question:
        return QA_SYSTEM_PROMPTS[vision_type]
    prompts = caption_system_prompts(vision_type)
    return prompts[int(caption_index) % len(prompts)]


def render_prompt(system: str, question: Optional[str] = None) -> str:
    """Upstream's rendered chat template up to `assistant\\n` with one visual item then the question in the user
    turn (data/system_prompt_render.py; images use <|video_pad|> too). An empty question is left out, as upstream."""
    q = question or ""
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
            f"<|vision_start|><|video_pad|><|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class UnderstandingPrompt:
    """A tokenized x2t prompt: [template text] [ViT block] [question + `<|im_end|>\\n<|im_start|>assistant\\n`].

    `positions` are get_rope_index's (3, L) ids over the whole prompt, without upstream's 1000 shift (x2t never
    shifts). The cache is filled with everything but the final "\\n", which is the first decode input.
    """

    sequence: Sequence
    positions: np.ndarray  # (3, L)
    system_prompt: str
    question: Optional[str]
    vision_type: str

    @property
    def input_ids(self) -> np.ndarray:
        return self.sequence.input_ids

    def __len__(self) -> int:
        return len(self.sequence)

    @property
    def vit_split(self) -> Split:
        return next(s for s in self.sequence.splits if s.kind == "vit")

    def split_positions(self, splits: Optional[List[Split]] = None) -> List[np.ndarray]:
        """(3, len) positions of each split (the prompt's splits by default)."""
        splits = self.sequence.splits if splits is None else splits
        starts = np.cumsum([0] + [len(s) for s in splits])
        return [self.positions[:, a:b] for a, b in zip(starts[:-1], starts[1:])]

    def context(self) -> Tuple[List[Split], List[np.ndarray]]:
        """The splits prefilled into the cache (the prompt minus its last token) and their positions."""
        splits = list(self.sequence.splits)
        last = splits[-1]
        if len(last) > 1:
            splits[-1] = replace(last, ids=last.ids[:-1], modality=last.modality[:-1])
        else:
            splits.pop()
        return splits, self.split_positions(splits)

    @property
    def last_token(self) -> int:
        return int(self.input_ids[-1])

    @property
    def last_position(self) -> int:
        """Position of the final "\\n" (text: equal on all axes, max of the prompt)."""
        return int(self.positions[0, -1])

    def with_visual_attention(self, attn: str) -> "UnderstandingPrompt":
        """A copy whose ViT block uses `attn` ("full" as upstream, or "causal" to compare with plain Qwen2.5-VL)."""
        splits = [replace(s, attn=attn) if s.kind == "vit" else s for s in self.sequence.splits]
        return replace(self, sequence=self.sequence.with_splits(splits))


def build_prompt(tokenizer, vit_grid: Tuple[int, int, int], vision_type: str = "image", question: Optional[str] = None,
                 vit_embeds=None, system: Optional[str] = None, caption_index: int = 0,
                 spatial_merge_size: int = 2, tokens_per_second: int = 2) -> UnderstandingPrompt:
    """Tokenize upstream's x2t template and expand its placeholder to the ViT tokens of `vit_grid`.

    `vit_grid` is the ViT patch grid (T/2, H/14, W/14) as the processor returns it; the block holds
    (T/2)·(H/28)·(W/28) tokens. The whole rendered string is tokenized at once, as upstream does
    (validation_dataset.py::render_template). `vit_embeds` (K, hidden) becomes the block's data.
    """
    if system is None:
        system = system_prompt(vision_type, question, caption_index)
    ids = list(tokenizer(render_prompt(system, question), add_special_tokens=False)["input_ids"])
    if ids.count(VISION_START) != 1 or ids.count(VIDEO_PAD) != 1 or ids.count(VISION_END) != 1 \
            or IMAGE_PAD in ids:
        raise InvalidRequestError("the question or system prompt contains vision special tokens "
                                  "(<|vision_start|>, <|video_pad|>, <|image_pad|>, <|vision_end|>); remove them")
    if ids[-3:] != [IM_START, ASSISTANT, NEWLINE]:
        raise WeightsError("the template did not tokenize to '<|im_start|>assistant\\n' at its end; is this the "
                           "Qwen2.5-VL tokenizer?")
    t, h, w = (int(v) for v in vit_grid)
    m = spatial_merge_size
    if t < 1 or h % m or w % m or h < m or w < m:
        raise ValueError(f"ViT grid {tuple(vit_grid)} must have t >= 1 and h, w positive multiples of {m}")
    merged = (t, h // m, w // m)
    k = ids.index(VISION_START)
    seq = Sequence([text_split(ids[:k]), vit_split(merged, vit_embeds), text_split(ids[k + 3:])],
                   spatial_merge_size=m, tokens_per_second=tokens_per_second)
    # Upstream lance.py::validation_und_KVcache calls get_rope_index with the same grid as image and video grid;
    # the <|video_pad|> placeholders select the video rule (second_per_grid_t 1.0). No shift_position_ids.
    pos = get_rope_index(seq.input_ids, seq.rope_grids, spatial_merge_size=m, tokens_per_second=tokens_per_second)
    return UnderstandingPrompt(seq, pos, system, question, vision_type)


# ---------------------------------------------------------------------------------------------------------------
Sampler = Callable[[mx.array], mx.array]


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> Sampler:
    """logits (1, V) -> token (1,). temperature 0: argmax (upstream's default). Otherwise softmax(logits / T),
    restricted to the smallest set of tokens whose probability reaches `top_p`, drawn from MLX's generator seeded
    with `seed` (one key split per step, so a seed gives one answer)."""
    if temperature < 0:
        raise InvalidRequestError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return lambda logits: mx.argmax(logits, axis=-1)
    state = {"key": mx.random.key(int(seed))}
    inv_t = 1.0 / float(temperature)

    def sample(logits: mx.array) -> mx.array:
        state["key"], key = mx.random.split(state["key"])
        scaled = logits.astype(mx.float32) * inv_t
        if top_p >= 1.0:
            return mx.random.categorical(scaled, key=key)
        order = mx.argsort(-scaled, axis=-1)  # (1, V) most likely first
        sorted_logits = mx.take_along_axis(scaled, order, axis=-1)
        probs = mx.softmax(sorted_logits, axis=-1)
        # keep a token while the mass before it is below top_p (the most likely token always stays)
        keep = (mx.cumsum(probs, axis=-1) - probs) < top_p
        pick = mx.random.categorical(mx.where(keep, sorted_logits, -mx.inf), key=key)
        return mx.take_along_axis(order, pick[:, None], axis=-1)[:, 0]

    return sample


class StreamingDetokenizer:
    """Turns token ids into text pieces as they arrive; a piece is released only once its bytes form whole UTF-8
    characters (a multi-byte character split across tokens decodes to U+FFFD until its last byte arrives)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._pending: List[int] = []

    def add(self, token_id: int) -> str:
        self._pending.append(int(token_id))
        text = self.tokenizer.decode(self._pending, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return ""
        self._pending = []
        return text

    def flush(self) -> str:
        text = self.tokenizer.decode(self._pending, skip_special_tokens=False) if self._pending else ""
        self._pending = []
        return text


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class UnderstandingResult:
    """The answer and its statistics. `token_ids` are the generated ids, the final <|im_end|> included when the
    answer ended on it (finish_reason "stop"; "length" when max_tokens ran out)."""

    text: str
    token_ids: List[int]
    prompt_tokens: int
    vision_seconds: float  # ViT encode
    prompt_seconds: float  # ViT encode + LLM prefill: time to the first decode step
    generation_seconds: float
    finish_reason: str
    peak_memory_gb: float = 0.0
    logits: List[mx.array] = field(default_factory=list, repr=False)  # per step, when keep_logits=True

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else 0.0


class TextStream:
    """Iterator over answer text pieces; `.result` is the UnderstandingResult once the iterator is exhausted."""

    def __init__(self, gen: Iterator[str]):
        self._gen = gen
        self.result: Optional[UnderstandingResult] = None

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        try:
            return next(self._gen)
        except StopIteration as stop:
            self.result = stop.value
            raise

    def run(self) -> UnderstandingResult:
        """Consume the stream and return the result."""
        for _ in self:
            pass
        return self.result


# ---------------------------------------------------------------------------------------------------------------
def prefill(model, prompt: UnderstandingPrompt, cache: Optional[List[KVCache]] = None) -> List[KVCache]:
    """Prefill the prompt minus its final "\\n" (upstream validation_und_KVcache): template text causal, the ViT
    block bidirectional over cache + block (markers included), the question causal; und expert throughout."""
    splits, positions = prompt.context()
    cache, _ = model.prefill(splits, positions, cache)
    return cache


def decode_tokens(model, cache: List[KVCache], first_token: int, first_position: int, max_tokens: int,
                  sampler: Sampler, vocab_limit: int, stop_ids: Seq[int] = (IM_END,)
                  ) -> Iterator[Tuple[int, mx.array]]:
    """Yield (token id, logits (1, vocab_limit)) per step: feed `first_token` at `first_position`, then each
    chosen token at the next text position. Ids >= vocab_limit (len(tokenizer)) are never chosen: upstream sets
    their logits to -inf, we drop them. Step n+1 is queued (async) before step n's token is read, so there is one
    host sync per token; the step after a stop token is computed and discarded."""
    lm = model.language_model
    stop = set(int(s) for s in stop_ids)
    cos, sin = lm.model.rope(text_positions(first_position, max_tokens))  # (max_tokens, head_dim) each

    def step(tok: mx.array, n: int) -> Tuple[mx.array, mx.array]:
        h = lm.model.embed_tokens(tok.reshape(1, 1))
        h = lm.model(h, rope=(cos[n:n + 1], sin[n:n + 1]), cache=cache, attn="causal")
        logits = lm.lm_head(h[:, -1])[:, :vocab_limit]  # (1, vocab_limit)
        return sampler(logits).astype(mx.int32), logits

    y, logits = step(mx.array([int(first_token)], dtype=mx.int32), 0)
    mx.async_eval(y, logits)
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            y_next, logits_next = step(y, n + 1)
            mx.async_eval(y_next, logits_next)
        tok = y.item()
        yield tok, logits
        if tok in stop:
            return
        if n + 1 < max_tokens:
            y, logits = y_next, logits_next


def generate(model, prompt: UnderstandingPrompt, tokenizer, max_tokens: int = MAX_TOKENS, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, keep_logits: bool = False,
             sampler: Optional[Sampler] = None) -> TextStream:
    """Answer a prompt: a TextStream of text pieces whose `.result` holds the full answer and statistics.

    Greedy by default, as upstream (do_sample False). vLLM-Omni's example samples at temperature 0.8 instead; pass
    temperature / top_p / seed for that, or any `sampler` (logits (1, V) -> token (1,)). The text is decoded as
    upstream does (special tokens kept, <|im_end|> removed, stripped); the streamed pieces join to it up to
    trailing whitespace. `keep_logits` keeps each step's logits in the result.
    """
    if int(max_tokens) <= 0:
        raise InvalidRequestError(f"max_tokens must be a positive number of tokens, got {max_tokens}")
    if sampler is None:
        sampler = make_sampler(temperature, top_p, seed)  # validates before any work
    limit = model.config.llm.max_position_embeddings
    if prompt.last_position + max_tokens >= limit:
        raise InvalidRequestError(f"the prompt ends at position {prompt.last_position}; with max_tokens {max_tokens} "
                                  f"it exceeds the context limit {limit}; use a smaller image/video or fewer tokens")
    vocab_limit = len(tokenizer) if tokenizer is not None else model.config.tokenizer_vocab_size
    return TextStream(_run(model, prompt, tokenizer, int(max_tokens), sampler, int(vocab_limit), keep_logits))


def _run(model, prompt, tokenizer, max_tokens, sampler, vocab_limit, keep_logits) -> Iterator[str]:
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    vit = prompt.vit_split
    if vit.data is None:
        raise ValueError("the prompt's ViT block has no embeddings; pass vit_embeds= to build_prompt")
    if isinstance(vit.data, mx.array):  # ViT output is lazy until here: time it apart from the LLM prefill
        mx.eval(vit.data)
    t1 = time.perf_counter()
    cache = prefill(model, prompt)
    t2 = time.perf_counter()

    detok = StreamingDetokenizer(tokenizer)
    ids: List[int] = []
    kept: List[mx.array] = []
    started = False
    finish = "length"
    for tok, logits in decode_tokens(model, cache, prompt.last_token, prompt.last_position, max_tokens, sampler,
                                     vocab_limit):
        ids.append(tok)
        if keep_logits:
            kept.append(logits)
        if tok == IM_END:
            finish = "stop"
            break
        piece = detok.add(tok)
        if not started:  # the answer is stripped, as upstream; drop leading whitespace from the stream too
            piece = piece.lstrip()
            started = bool(piece)
        if piece:
            yield piece
    tail = detok.flush() if started else detok.flush().lstrip()
    if tail:
        yield tail
    t3 = time.perf_counter()
    # upstream inference_lance.py: tokenizer.decode(generated).replace("<|im_end|>", "").strip()
    text = tokenizer.decode(ids, skip_special_tokens=False).replace("<|im_end|>", "").strip()
    return UnderstandingResult(text=text, token_ids=ids, prompt_tokens=len(prompt), vision_seconds=t1 - t0,
                               prompt_seconds=t2 - t0, generation_seconds=t3 - t2, finish_reason=finish,
                               peak_memory_gb=mx.get_peak_memory() / 2**30, logits=kept)


# ---------------------------------------------------------------------------------------------------------------
def prompt_logits(model, prompt: UnderstandingPrompt) -> mx.array:
    """Logits (L, vocab) of every prompt token through the cached prefill path (the final "\\n" included)."""
    _, hidden = model.prefill(prompt.sequence.splits, prompt.split_positions(), return_hidden=True)
    return model.language_model.lm_head(mx.concatenate(hidden, axis=1)[0])


def sequence_logits(model, prompt: UnderstandingPrompt, continuation: Seq[int] = ()) -> mx.array:
    """Reference logits (L + n, vocab) of prompt + continuation ids in one uncached forward with upstream's
    explicit attention mask (data_utils.py::create_sparse_mask); continuation tokens take the next text positions."""
    cont = np.asarray(list(continuation), dtype=np.int64)
    splits = list(prompt.sequence.splits)
    pos = prompt.positions
    if cont.size:
        splits.append(text_split(cont))
        pos = np.concatenate([pos, text_positions(prompt.last_position + 1, cont.size)], axis=1)
    h = mx.concatenate([model.embed_split(s) for s in splits], axis=1)
    mask = mx.array(attention_mask([len(s) for s in splits], [s.attn for s in splits]))
    out = model.language_model.model(h, pos, attn=mask)
    return model.language_model.lm_head(out[0])


def encode_visual(vit, patches, grid_thw) -> mx.array:
    """ViT embeddings (K, hidden) of preprocessed patch rows, in raster order (t, h/2, w/2)."""
    return vit(mx.array(np.asarray(patches)), grid_thw)


__all__ = [
    "MAX_TOKENS", "QA_SYSTEM_PROMPTS", "StreamingDetokenizer", "TextStream", "UnderstandingPrompt",
    "UnderstandingResult", "build_prompt", "decode_tokens", "encode_visual", "generate", "make_sampler",
    "prefill", "prompt_logits", "render_prompt", "sequence_logits", "system_prompt",
]
