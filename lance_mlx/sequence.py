"""Token layouts of Lance tasks: chat templates, splits, attention modes, 3-D mRoPE position ids, CFG branches."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, List, Optional, Tuple
from typing import Sequence as Seq

import numpy as np

from .config import IM_END, IM_START, IMAGE_PAD, NEWLINE, VIDEO_PAD, VISION_END, VISION_START  # noqa: F401
from .positions import attention_mask, get_rope_index  # noqa: F401  (re-exported: part of the layout API)

# ---------------------------------------------------------------------------------------------------------------
# Template words as Qwen2.5 token ids (checked against the tokenizer in tests/test_sequence.py).
_SYSTEM = 8948  # "system"
_USER = 872  # "user"
ASSISTANT = 77091  # "assistant"

# Modality codes of upstream data/datasets_custom/validation_dataset.py (`modality_map`).
MODALITY_SYSTEM = -1  # template text
MODALITY_TEXT = 0  # the user prompt / instruction (dropped by the text-CFG branch)
MODALITY_NOISE = 1  # target latents
MODALITY_REF_SOURCE = 2  # conditioning latents of edit tasks
MODALITY_REF_IMAGE = 3  # conditioning latents of identity-preserving tasks
MODALITY_REF_VIT = 4  # ViT blocks
# Our image-guidance branch drops the instruction, the conditioning latents and the ViT block; upstream's own
# version of this branch (cfg_vit) cannot run (docs/editing.md).
TEXT_AND_VISION = (MODALITY_TEXT, MODALITY_REF_SOURCE, MODALITY_REF_VIT)

# ---------------------------------------------------------------------------------------------------------------
# System prompts, verbatim from upstream data/common.py::generate_system_prompt (the edit prompts use the
# typographic apostrophe U+2019, which tokenizes differently from ASCII "'").
SYSTEM_PROMPT_T2I = (
    "Describe the image by detailing the color, quantity, text, shape, size, texture, spatial relationships of "
    "the objects and background:"
)
SYSTEM_PROMPT_T2V = (
    "Describe the video by detailing the color, quantity, visible text, shape, size, texture, spatial "
    "relationships and motion/camera movements of the objects and background:"
)


def edit_system_prompt(vision_type: str = "image") -> str:
    """System prompt of image_edit ("image") and video_edit ("video")."""
    v = vision_type
    return (
        f"Describe the key features of the input {v} (color, shape, size, texture, objects, background), then "
        f"explain how the user\u2019s text instruction should alter or modify the {v}. Generate a new {v} that meets "
        f"the user\u2019s requirements while maintaining consistency with the original input where appropriate."
    )


def caption_system_prompts(vision_type: str = "image") -> List[str]:
    """The four understanding prompts upstream picks from at random when no question is given."""
    v = vision_type
    return [
        f"Generate a detailed and accurate description of the {v}, including all the key moments and visual details.",
        f"Write an in-depth depiction of the {v}, covering all its aspects.",
        f"Write an exhaustive depiction of the given {v}, capturing its essence and key moments.",
        f"Describe the key features of the input {v}, including color, shape, size, texture, objects, background.",
    ]


# Question-answering system prompts of upstream config/examples/x2t_{image,video}_example.json.
QA_SYSTEM_PROMPTS = {
    "image": "Look at the image carefully and answer the question.",
    "video": "Watch the video carefully and answer the question.",
}

SYSTEM_PROMPTS = {
    "t2i": SYSTEM_PROMPT_T2I,
    "t2v": SYSTEM_PROMPT_T2V,
    "i2v": SYSTEM_PROMPT_T2V,
    "image_edit": edit_system_prompt("image"),
    "video_edit": edit_system_prompt("video"),
    "x2t_image": QA_SYSTEM_PROMPTS["image"],
    "x2t_video": QA_SYSTEM_PROMPTS["video"],
}

# The same prompts as Qwen2.5-VL token ids (checked against the tokenizer in tests/test_sequence.py), so the
# generation templates can be built without a tokenizer.
_EDIT_IDS = [74785, 279, 1376, 4419, 315, 279, 1946, None, 320, 3423, 11, 6083, 11, 1379, 11, 10434, 11, 6171, 11,
             4004, 701, 1221, 10339, 1246, 279, 1196, 748, 1467, 7600, 1265, 11596, 476, 5602, 279, None, 13, 19813,
             264, 501, None, 429, 20027, 279, 1196, 748, 8502, 1393, 20337, 28137, 448, 279, 4024, 1946, 1380, 8311,
             13]
_IMAGE, _VIDEO = 2168, 2766  # "image", "video" after a space
SYSTEM_PROMPT_IDS = {
    "t2i": [74785, 279, 2168, 553, 44193, 279, 1894, 11, 12194, 11, 1467, 11, 6083, 11, 1379, 11, 10434, 11, 27979,
            11871, 315, 279, 6171, 323, 4004, 25],
    "t2v": [74785, 279, 2766, 553, 44193, 279, 1894, 11, 12194, 11, 9434, 1467, 11, 6083, 11, 1379, 11, 10434, 11,
            27979, 11871, 323, 11379, 2899, 3436, 19029, 315, 279, 6171, 323, 4004, 25],
    "image_edit": [_IMAGE if i is None else i for i in _EDIT_IDS],
    "video_edit": [_VIDEO if i is None else i for i in _EDIT_IDS],
}
SYSTEM_PROMPT_IDS["i2v"] = SYSTEM_PROMPT_IDS["t2v"]

# Fixed pieces of upstream's chat template (data/system_prompt_render.py), rendered then `.strip()`ped.
HEAD_IDS = [IM_START, _SYSTEM, NEWLINE]  # "<|im_start|>system\n"
USER_IDS = [IM_END, NEWLINE, IM_START, _USER, NEWLINE]  # "<|im_end|>\n<|im_start|>user\n"
ASSISTANT_IDS = [IM_END, NEWLINE, IM_START, ASSISTANT, NEWLINE]  # "<|im_end|>\n<|im_start|>assistant\n"
END_IDS = [IM_END]  # the trailing "\n" after the last <|im_end|> is stripped


def _ids(x) -> np.ndarray:
    return np.asarray(list(x) if not isinstance(x, np.ndarray) else x, dtype=np.int64).reshape(-1)


def system_prompt_ids(task: str, tokenizer=None) -> List[int]:
    """Token ids of a task's system prompt: from `tokenizer` when given, else the built-in Qwen2.5 ids."""
    if tokenizer is not None:
        return list(tokenizer(SYSTEM_PROMPTS[task], add_special_tokens=False)["input_ids"])
    if task not in SYSTEM_PROMPT_IDS:
        raise ValueError(f"no built-in token ids for the {task!r} system prompt; pass tokenizer=")
    return list(SYSTEM_PROMPT_IDS[task])


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Split:
    """A run of tokens that is prefilled (or queried) as one unit, with one attention mode.

    `kind` is "text", "vit" (a ViT block) or "latent" (a VAE-latent block). Visual blocks include their
    <|vision_start|>/<|vision_end|> markers; `grid` is the LLM token grid (t, h, w) of their body. Latent bodies
    take the gen expert, everything else the und expert. `data` carries the block's input for later tasks (ViT
    embeddings (K, hidden) or conditioning latents (t*h*w, 48)); it is opaque here.
    """

    ids: np.ndarray  # (L,) token ids
    attn: str  # "causal" | "full" | "full_noise" (treated as full) | "noise"
    modality: np.ndarray  # (L,) upstream modality codes
    kind: str = "text"
    grid: Optional[Tuple[int, int, int]] = None
    data: Any = None

    def __post_init__(self):
        self.ids = _ids(self.ids)
        self.modality = np.broadcast_to(np.asarray(self.modality, dtype=np.int64), self.ids.shape).copy()
        if self.attn not in ("causal", "full", "full_noise", "noise"):
            raise ValueError(f"unknown attention mode {self.attn!r}")
        if self.kind != "text":
            t, h, w = self.grid
            if len(self.ids) != t * h * w + 2:
                raise ValueError(f"{self.kind} split has {len(self.ids)} ids, expected {t * h * w + 2}")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def is_causal(self) -> bool:
        return self.attn == "causal"

    @property
    def gen_mask(self) -> np.ndarray:
        """(L,) True where the token takes the gen expert (latent bodies; their markers stay und)."""
        m = np.zeros(len(self.ids), dtype=bool)
        if self.kind == "latent":
            m[1:-1] = True
        return m


def text_split(ids, modality: int = MODALITY_SYSTEM) -> Split:
    """A causal text split (template text by default)."""
    return Split(ids=ids, attn="causal", modality=modality)


def vit_split(grid: Tuple[int, int, int], data: Any = None) -> Split:
    """A ViT block; `grid` = merged token grid (T/2, H/28, W/28) of the image or video."""
    t, h, w = (int(v) for v in grid)
    ids = [VISION_START] + [VIDEO_PAD] * (t * h * w) + [VISION_END]
    return Split(ids=ids, attn="full", modality=MODALITY_REF_VIT, kind="vit", grid=(t, h, w), data=data)


def latent_split(shape: Tuple[int, int, int], role: str = "target", data: Any = None,
                 modality: Optional[int] = None) -> Split:
    """A VAE-latent block of grid (t, h, w): role "target" (noise) or "cond" (full_noise, modality 2 by default)."""
    t, h, w = (int(v) for v in shape)
    ids = [VISION_START] + [VIDEO_PAD] * (t * h * w) + [VISION_END]
    if role == "target":
        attn, mod = "noise", MODALITY_NOISE
    elif role == "cond":
        attn, mod = "full_noise", MODALITY_REF_SOURCE
    else:
        raise ValueError(f"latent role must be 'target' or 'cond', got {role!r}")
    return Split(ids=ids, attn=attn, modality=mod if modality is None else modality, kind="latent",
                 grid=(t, h, w), data=data)


def find_first(haystack: Seq[int], needle: Seq[int]) -> int:
    """Index of the first occurrence of `needle` in `haystack`, or -1 (upstream's prompt search)."""
    hay, nd = list(haystack), list(needle)
    n = len(nd)
    if n == 0:
        return -1
    for i in range(len(hay) - n + 1):
        if hay[i] == nd[0] and hay[i:i + n] == nd:
            return i
    return -1


def chat_sequence(system_ids, user: List[Any], assistant: List[Any], prompt_ids=None) -> "Sequence":
    """Upstream's chat template with visual items expanded, cut into splits as upstream does.

    `user` / `assistant` are lists of items: token-id lists (text) or `Split`s from `vit_split` /
    `latent_split`. Text runs between visual blocks become causal splits; the user prompt (`prompt_ids`) is
    located by its FIRST occurrence in the whole id sequence, like upstream's search, and becomes its own
    split (modality 0) when it falls in a text run that precedes a visual block. Upstream:
    data/system_prompt_render.py, validation_dataset.py::process_text_template.
    """
    items: List[Any] = [HEAD_IDS + list(system_ids) + USER_IDS]
    items += list(user)
    items.append(ASSISTANT_IDS)
    items += list(assistant)
    items.append(END_IDS)

    # Merge adjacent text items into runs; keep visual splits as they are.
    runs: List[Any] = []
    for it in items:
        if isinstance(it, Split):
            runs.append(it)
        else:
            ids = [int(i) for i in _ids(it)]
            if runs and isinstance(runs[-1], list):
                runs[-1].extend(ids)
            else:
                runs.append(ids)
    all_ids = [i for r in runs for i in (r if isinstance(r, list) else r.ids.tolist())]

    span = None
    if prompt_ids is not None:
        p = [int(i) for i in _ids(prompt_ids)]
        start = find_first(all_ids, p)
        if start < 0:
            raise ValueError("the prompt's token ids do not occur in the templated sequence; tokenize the prompt "
                             "alone with add_special_tokens=False")
        span = (start, start + len(p))

    splits: List[Split] = []
    pos = 0
    for k, r in enumerate(runs):
        if isinstance(r, Split):
            splits.append(r)
            pos += len(r)
            continue
        n = len(r)
        mod = np.full(n, MODALITY_SYSTEM, dtype=np.int64)
        if span is not None:  # the prompt's tokens get modality 0 wherever they are
            a, b = max(span[0], pos) - pos, min(span[1], pos + n) - pos
            if a < b:
                mod[a:b] = MODALITY_TEXT
        followed_by_visual = any(isinstance(x, Split) for x in runs[k + 1:])
        cuts = [0, n]
        if span is not None and followed_by_visual and pos <= span[0] < pos + n:
            a = span[0] - pos
            cuts = sorted({0, a, min(a + span[1] - span[0], n), n})
        for a, b in zip(cuts[:-1], cuts[1:]):
            if b > a:
                splits.append(Split(ids=r[a:b], attn="causal", modality=mod[a:b]))
        pos += n
    return Sequence(splits)


def generation_sequence(task: str, prompt_ids, latent_shape: Tuple[int, int, int], tokenizer=None,
                        system_ids=None) -> "Sequence":
    """t2i / t2v / i2v layout: [template + prompt] [<|im_end|>\\n<|im_start|>assistant\\n] [target] [<|im_end|>]."""
    if system_ids is None:
        system_ids = system_prompt_ids(task, tokenizer)
    p = _ids(prompt_ids)
    return chat_sequence(system_ids, [p], [latent_split(latent_shape, "target")], prompt_ids=p)


def edit_sequence(instruction_ids, vit_grid, latent_shape, vision_type: str = "image", tokenizer=None,
                  vit_data=None, cond_data=None, system_ids=None) -> "Sequence":
    """image_edit / video_edit layout: USER = [ViT block, conditioning latents, instruction], ASSISTANT = target.

    Upstream rotates the instruction text to the end of the user turn (validation_dataset.py::tiv2v_sample).
    """
    if system_ids is None:
        system_ids = system_prompt_ids(f"{vision_type}_edit", tokenizer)
    p = _ids(instruction_ids)
    user = [vit_split(vit_grid, vit_data), latent_split(latent_shape, "cond", cond_data), p]
    return chat_sequence(system_ids, user, [latent_split(latent_shape, "target")], prompt_ids=p)


# ---------------------------------------------------------------------------------------------------------------
def shift_position_ids(position_ids: np.ndarray, attn_modes: Seq[str], modality: np.ndarray) -> np.ndarray:
    """Upstream data/common.py::shift_position_ids (pro_type 10), applied when a full/full_noise split exists.

    ViT tokens (modality 4): temporal axis shifted so the first one sits at 1000; modality-3 latents: first at
    2000; when the conditioning latents (modality 2) are as many as the target latents (modality 1), the target
    takes the conditioning block's positions on all axes (markers included).
    """
    pos = np.array(position_ids, dtype=np.int64, copy=True)
    if not any(m in ("full_noise", "full") for m in attn_modes):
        return pos
    modality = np.asarray(modality)
    for code, base in ((MODALITY_REF_VIT, 1000), (MODALITY_REF_IMAGE, 2000)):
        sel = modality == code
        if pos[:, sel].sum() != 0:
            pos[0, sel] += base - pos[0, sel][0]
    m2, m1 = modality == MODALITY_REF_SOURCE, modality == MODALITY_NOISE
    if pos[:, m2].sum() != 0 and m2.sum() == m1.sum():
        pos[:, m1] = pos[:, m2]
    return pos


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Branch:
    """What one CFG branch runs: context splits prefilled into a KV cache, then the noise block as a query."""

    context: List[Split]
    context_positions: List[np.ndarray]  # (3, len(split)) per context split
    noise: Split
    noise_positions: np.ndarray  # (3, len(noise))

    @property
    def context_len(self) -> int:
        return sum(len(s) for s in self.context)

    @property
    def kv_position_ids(self) -> np.ndarray:
        """(3, context + noise) positions the branch's keys carry."""
        return np.concatenate(self.context_positions + [self.noise_positions], axis=1)

    @property
    def split_lens(self) -> List[int]:
        return [len(s) for s in self.context] + [len(self.noise)]

    @property
    def attn_modes(self) -> List[str]:
        return [s.attn for s in self.context] + [self.noise.attn]


@dataclass
class Sequence:
    """An ordered list of splits making one sample (upstream's packed sequence of one sample)."""

    splits: List[Split] = field(default_factory=list)
    spatial_merge_size: int = 2
    tokens_per_second: int = 2
    # The negative prompt: text the branches that drop the prompt carry in its place (None: upstream's branches)
    negative: Optional[Split] = None

    @property
    def input_ids(self) -> np.ndarray:
        return np.concatenate([s.ids for s in self.splits])

    @property
    def modality(self) -> np.ndarray:
        return np.concatenate([s.modality for s in self.splits])

    @property
    def gen_mask(self) -> np.ndarray:
        return np.concatenate([s.gen_mask for s in self.splits])

    @property
    def split_lens(self) -> List[int]:
        return [len(s) for s in self.splits]

    @property
    def attn_modes(self) -> List[str]:
        return [s.attn for s in self.splits]

    @property
    def rope_grids(self) -> List[Tuple[int, int, int]]:
        """Visual grids in the form upstream passes to get_rope_index (pre-merge h, w)."""
        m = self.spatial_merge_size
        return [(s.grid[0], s.grid[1] * m, s.grid[2] * m) for s in self.splits if s.kind != "text"]

    def __len__(self) -> int:
        return sum(self.split_lens)

    def _positions(self, ids, attn_modes, modality, grids=None) -> np.ndarray:
        grids = self.rope_grids if grids is None else grids
        pos = get_rope_index(ids, grids, spatial_merge_size=self.spatial_merge_size,
                             tokens_per_second=self.tokens_per_second)
        return shift_position_ids(pos, attn_modes, modality)

    def position_ids(self) -> np.ndarray:
        """(3, L) mRoPE positions: get_rope_index over the whole sequence, then shift_position_ids."""
        return self._positions(self.input_ids, self.attn_modes, self.modality)

    def position_ids_without(self, drop_modalities: Seq[int]) -> np.ndarray:
        """Positions recomputed on the sequence with the tokens of `drop_modalities` removed (3, L_kept); when the
        prompt is dropped and a negative prompt is set, the negative's tokens stand in the prompt's place."""
        drop = np.asarray(list(drop_modalities), dtype=np.int64)
        ids, modality, kept_modes, grids = [], [], [], []
        visual = iter(self.rope_grids)
        for s in self.splits:
            grid = next(visual) if s.kind != "text" else None
            s = self._stand_in(s, drop_modalities)
            keep = np.ones(len(s), dtype=bool) if s is self.negative else ~np.isin(s.modality, drop)
            ids.append(s.ids[keep])
            modality.append(s.modality[keep])
            if keep.all():  # upstream get_uncond_attn_modes_split_lens: the modes of the splits kept whole
                kept_modes.append(s.attn)
                grids += [grid] if grid is not None else []  # a dropped visual block takes its grid along
        return self._positions(np.concatenate(ids), kept_modes, np.concatenate(modality), grids)

    def _stand_in(self, split: Split, drop_modalities: Seq[int]) -> Split:
        """The negative prompt in place of the prompt's split, in a branch that drops the prompt."""
        dropped = MODALITY_TEXT in drop_modalities and split.modality[0] == MODALITY_TEXT
        return self.negative if dropped and self.negative is not None else split

    def with_negative(self, negative_ids) -> "Sequence":
        """This sequence with a negative prompt (token ids; empty: none, i.e. upstream's branches)."""
        ids = _ids(negative_ids if negative_ids is not None else [])
        return replace(self, negative=Split(ids, "causal", MODALITY_TEXT) if ids.size else None)

    @property
    def noise_index(self) -> int:
        for i, s in enumerate(self.splits):
            if s.attn == "noise":
                return i
        raise ValueError("the sequence has no noise (target) split")

    def branch(self, drop_modalities: Seq[int] = ()) -> Branch:
        """The conditional branch (nothing dropped) or a CFG branch without the given modalities.

        Upstream lance.py::validation_gen_KVcache: a context split is kept when its FIRST token's modality is
        not dropped, and keeps its conditional position ids; the noise block takes the positions computed by
        get_rope_index + shift_position_ids on the token sequence with the dropped tokens removed, read at the
        kept context's length. With a negative prompt (`with_negative`), a branch that drops the prompt carries
        the negative's split in its place, positioned like the noise block: on that shortened sequence with the
        negative's tokens in the prompt's place (docs/steering.md).
        """
        pos = self.position_ids()
        k = self.noise_index
        starts = np.cumsum([0] + self.split_lens)
        drop = np.isin(self.modality, np.asarray(list(drop_modalities), dtype=np.int64))
        ctx, ctx_pos = [], []
        for i in range(k):
            s = self._stand_in(self.splits[i], drop_modalities)
            if s is self.negative:  # its positions follow the kept tokens before it, on the shortened sequence
                ctx.append(s)
                ctx_pos.append(int((~drop[:starts[i]]).sum()))
            elif s.modality[0] not in drop_modalities:
                ctx.append(s)
                ctx_pos.append(pos[:, starts[i]:starts[i + 1]])
        noise = self.splits[k]
        if not drop.any():
            return Branch(ctx, ctx_pos, noise, pos[:, starts[k]:starts[k + 1]])
        upos = self.position_ids_without(drop_modalities)
        ctx_pos = [upos[:, p:p + len(s)] if isinstance(p, int) else p for s, p in zip(ctx, ctx_pos)]
        kv_len = sum(len(s) for s in ctx)
        return Branch(ctx, ctx_pos, noise, upos[:, kv_len:kv_len + len(noise)])

    def cfg_branches(self) -> Tuple[Branch, Branch]:
        """(conditional, text-unconditional) branches; upstream cfg_type 0 drops the modality-0 tokens."""
        return self.branch(()), self.branch((MODALITY_TEXT,))

    def with_splits(self, splits: List[Split]) -> "Sequence":
        return replace(self, splits=list(splits))
