"""Prompt enhancement: a short prompt rewritten into the detailed caption style Lance was trained on, by the loaded
checkpoint's own understanding expert or by an OpenAI-compatible chat endpoint (upstream's
common/utils/caption_rewrite.py does the latter for t2v and i2v; docs/steering.md)."""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from .config import IM_END
from .errors import GenerationError, InvalidRequestError

# Upstream's environment variables (common/utils/caption_rewrite.py), read when the flags are not given.
ENV_BASE_URL, ENV_MODEL, ENV_API_KEY = "LANCE_REWRITE_BASE_URL", "LANCE_REWRITE_MODEL_NAME", "LANCE_REWRITE_API_KEY"
TEMPERATURE = 0.3  # upstream caption_rewrite.py TEMPERATURE (endpoint)
ENDPOINT_MAX_TOKENS = 2048  # upstream caption_rewrite.py MAX_TOKENS
# Ours: the checkpoint decodes greedily (as its understanding path), and a caption of the examples' length is
# about 150-300 tokens; the bound keeps a model that never stops from running long.
CHECKPOINT_MAX_TOKENS = 512
ENDPOINT_TIMEOUT_S = 120.0
TASKS = ("t2i", "t2v", "i2v")  # upstream rewrites t2v and i2v prompts; t2i uses the same rule for a still image
MODES = ("on", "fallback")  # fallback: a failed rewrite warns and generates from the original prompt

SYSTEM_PROMPT = "You rewrite short prompts into detailed captions for an image and video generator."

# Our own style examples, written like the captions of upstream's config/examples/t2v_example.json and
# i2v_example.json: framing and subject first, then setting and light, then the action and the camera.
EXAMPLES = {
    "t2i": [
        "A close-up shows an old clockmaker with silver stubble and round brass glasses bent over a workbench, "
        "holding a tiny gear in steel tweezers. Warm lamp light falls from the left across scattered springs, "
        "open pocket watches and a worn leather apron, while the shelves behind him fade into soft brown shadow. "
        "Sharp focus on his hands and the gear, fine texture on skin, metal and wood.",
        "A wide view shows a red lighthouse on a black basalt cliff at dusk, its beam cutting through a violet sky "
        "streaked with thin clouds. Waves break white against the rocks below, a narrow stone path winds up to the "
        "door, and the first stars appear above the sea. Calm, cool colours with the warm glow of the lamp room.",
        "A medium shot shows a small orange cat curled up in a woven basket on a sunny windowsill, paws tucked "
        "under its chest and eyes half closed. Potted herbs stand beside the basket, lace curtains diffuse the "
        "morning light, and a blurred garden is visible through the glass. Soft pastel tones, shallow depth of "
        "field.",
    ],
    "t2v": [
        "A medium-close shot shows a young woman in a yellow raincoat standing at a busy tram stop on a rainy "
        "evening, neon signs reflecting in the puddles around her boots. The street behind her is full of blurred "
        "umbrellas and passing headlights, and soft cyan and pink light glows on the wet pavement. She looks up, "
        "smiles, and opens a clear umbrella as the first tram pulls in. The camera slowly pushes in toward her "
        "face.",
        "A wide shot shows a herd of wild horses galloping across a golden grass plain at sunset, dust rising "
        "behind their hooves. Low orange light outlines their manes, distant blue mountains line the horizon, and "
        "a few clouds glow pink overhead. The lead stallion tosses its head as the herd turns toward the camera. "
        "The camera tracks alongside the herd at a steady pace.",
        "A close-up shows a chef's hands kneading pale dough on a floured wooden counter in a bright kitchen, "
        "sleeves rolled up and flour dusting the knuckles. Copper pans hang on the tiled wall behind, and morning "
        "light comes through a window on the right. The hands fold, press and turn the dough in a steady rhythm. "
        "The camera holds still, then tilts up slightly to reveal the window.",
    ],
    "i2v": [
        "A fluffy grey kitten sits on a knitted blue blanket beside a window, looking up with wide amber eyes. The "
        "kitten stays the clear main subject in a medium-close framing, its fur, whiskers and small pink nose "
        "consistent throughout. Soft daylight from the window lights one side of its face, and a green plant and a "
        "wooden shelf rest out of focus behind it. The kitten slowly stretches one paw toward the camera, yawns and "
        "settles back down. The camera stays steady with a gentle push-in.",
        "A sailing boat with white sails glides across a calm turquoise bay under a clear midday sky, green hills "
        "and a small harbour town on the far shore. The boat keeps its shape, colours and rigging consistent as it "
        "moves, and sunlight sparkles on the water around the hull. A light breeze fills the sails and the boat "
        "leans slightly as it turns toward the open sea. The camera pans smoothly to follow it.",
    ],
}

_RULES = {
    "t2i": ("a text-to-image model",
            "Open with the framing and the main subject (appearance, pose, what it is doing), then the setting, "
            "light, colours and composition. Describe one still picture: no motion over time, no camera movement."),
    "t2v": ("a text-to-video model",
            "Open with the framing and the main subject, then the setting, light and colours, then the action as "
            "it unfolds, and end with how the camera moves."),
    "i2v": ("an image-to-video model that starts from the attached image",
            "The caption must be grounded in the image: describe what it shows (the main subject, its appearance "
            "and pose, the setting, light, colours and layout), then the motion the prompt asks for, and end with "
            "how the camera moves. Keep the subject consistent with the image."),
}


def rewrite_instruction(task: str, prompt: str) -> str:
    """The rewrite request for `task`: our instruction, our style examples, then the user's prompt."""
    model, rules = _RULES[task]
    examples = "\n\n".join(f"Example {i + 1}:\n{e}" for i, e in enumerate(EXAMPLES[task]))
    return (f"Rewrite the prompt below into one detailed English caption for {model}.\n"
            "Keep every subject, action, place and detail the prompt gives; do not add new characters, objects, "
            "places or events it does not imply. "
            f"{rules} Write one paragraph of plain sentences without lists, headings, markdown or quotation marks. "
            "If the prompt is not in English, translate it naturally. Reply with the caption only.\n\n"
            f"Examples of the style:\n\n{examples}\n\nPrompt:\n{prompt.strip()}\n\nCaption:")


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Enhancer:
    """How prompts are enhanced: by the loaded checkpoint (no `endpoint`) or by `model` at an OpenAI-compatible
    `endpoint`; `fallback` turns a failed rewrite into a warning and the original prompt."""

    fallback: bool = False
    endpoint: Optional[str] = None
    model: Optional[str] = None
    api_key: Optional[str] = field(default=None, repr=False)  # a secret: never in a repr, a log or an answer

    def __post_init__(self):
        if self.endpoint is None:
            return
        if _host_of(self.endpoint) is None:
            raise InvalidRequestError(f"the enhancement endpoint must be an http:// or https:// URL with a host "
                                      f"(such as http://127.0.0.1:8080/v1), got {self.endpoint!r}", "enhance_endpoint")
        if not self.model:
            raise InvalidRequestError(f"an enhancement endpoint needs a model name: pass --enhance-model NAME (or set "
                                      f"{ENV_MODEL})", "enhance_model")

    @classmethod
    def from_env(cls, fallback: bool = False, endpoint: Optional[str] = None,
                 model: Optional[str] = None) -> "Enhancer":
        """Flags first, then upstream's LANCE_REWRITE_* variables; without an endpoint, the checkpoint rewrites."""
        endpoint = endpoint or os.environ.get(ENV_BASE_URL) or None
        model = (model or os.environ.get(ENV_MODEL) or None) if endpoint else None
        return cls(fallback, endpoint, model, os.environ.get(ENV_API_KEY) or None)

    @property
    def public_endpoint(self) -> Optional[str]:
        """The endpoint without what may hold a secret (user:password@, a query, a fragment)."""
        if self.endpoint is None:
            return None
        parts = urlsplit(self.endpoint)
        return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))

    @property
    def source(self) -> str:
        return f"{self.model} at {self.public_endpoint}" if self.endpoint else "checkpoint"

    def describe(self) -> Dict[str, Optional[str]]:
        """What rewrites, fit to show (the server's /v1/models): no key, no credentials in the URL."""
        if self.endpoint is None:
            return {"by": "checkpoint"}
        return {"by": "endpoint", "endpoint": self.public_endpoint, "model": self.model}

    @property
    def needs_model(self) -> bool:
        """Whether the rewrite needs the loaded pipeline (the checkpoint's own understanding expert)."""
        return self.endpoint is None

    def check(self, task: str) -> None:
        if task not in TASKS:
            raise InvalidRequestError(f"prompt enhancement applies to {', '.join(TASKS)}, not {task}; drop "
                                      "--enhance-prompt", "enhance_prompt")

    def rewrite(self, task: str, prompt: str, image=None, pipeline=None) -> str:
        """The enhanced prompt, or an EnhanceError (exit 1) naming what failed."""
        if self.endpoint:
            return rewrite_with_endpoint(self, task, prompt, image)
        return rewrite_with_checkpoint(pipeline, task, prompt, image)

    def apply(self, request, pipeline=None, warn: Optional[Callable[[str], Any]] = None
              ) -> Tuple[Any, Optional[str]]:
        """(request with the enhanced prompt, the enhanced prompt) — or with `fallback`, after a failure, (request,
        None) and a warning through `warn` (default: a line on stderr)."""
        self.check(request.task)
        try:
            revised = self.rewrite(request.task, request.prompt, getattr(request, "image", None), pipeline)
        except EnhanceError as e:
            if not self.fallback:
                raise
            (warn or _stderr)(f"warning: {e}; generating from the original prompt")
            return request, None
        return dataclasses.replace(request, prompt=revised), revised


class EnhanceError(GenerationError):
    """The rewrite failed (endpoint unreachable or refusing, empty answer): exit 1, HTTP 502 from the server."""


def _host_of(url: str) -> Optional[str]:
    """The host of an http(s) URL, else None (another scheme, no host, a malformed port or address)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        return None
    return parts.hostname if parts.scheme in ("http", "https") else None


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _failed(what: str, fix: str) -> EnhanceError:
    return EnhanceError(f"prompt enhancement failed: {what}; {fix}, or pass --enhance-prompt fallback to "
                           "generate from the original prompt")


def _clean(text: Optional[str], source: str) -> str:
    text = (text or "").strip().strip('"').strip()
    if not text:
        raise _failed(f"{source} returned an empty prompt", "try again or use another model")
    return text


# ------------------------------------------------------------------------------------------------ endpoint
def image_data_url(image) -> str:
    """A PIL image as a PNG data URL (the chat API's image_url content)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def rewrite_with_endpoint(enhancer: Enhancer, task: str, prompt: str, image=None) -> str:
    """One chat completion at the endpoint, as upstream's run_chat_completion: the whole instruction in one user
    message (with the image for i2v), temperature 0.3, up to 2048 tokens."""
    import openai

    content: List[dict] = [{"type": "text", "text": rewrite_instruction(task, prompt)}]
    if task == "i2v" and image is not None:
        content.append({"type": "image_url", "image_url": {"url": image_data_url(image)}})
    # local servers ignore the key, but the client refuses to start without one
    client = openai.OpenAI(base_url=enhancer.endpoint, api_key=enhancer.api_key or "unused",
                           timeout=ENDPOINT_TIMEOUT_S, max_retries=0)
    try:
        response = client.chat.completions.create(model=enhancer.model,
                                                  messages=[{"role": "user", "content": content}],
                                                  max_tokens=ENDPOINT_MAX_TOKENS, temperature=TEMPERATURE)
        text = response.choices[0].message.content if response.choices else None
    except openai.APIConnectionError:
        raise _failed(f"cannot reach {enhancer.endpoint}", "start the endpoint or fix --enhance-endpoint") from None
    except openai.APIStatusError as e:
        raise _failed(f"{enhancer.endpoint} answered HTTP {e.status_code}",
                      "check --enhance-model and the API key") from None
    except (openai.OpenAIError, ValueError, AttributeError) as e:
        raise _failed(f"{enhancer.endpoint} gave no usable answer ({type(e).__name__})",
                      "check that it is an OpenAI-compatible chat endpoint") from None
    return _clean(text, enhancer.endpoint)


# ---------------------------------------------------------------------------------------------- checkpoint
def rewrite_with_checkpoint(pipeline, task: str, prompt: str, image=None, max_tokens: int = CHECKPOINT_MAX_TOKENS
                            ) -> str:
    """The rewrite by the loaded checkpoint's understanding expert (the same weights that generate): greedy
    decoding of our instruction as one chat turn; for i2v the first frame goes through the ViT in front of it,
    as in an image question (lance_mlx/understanding.py)."""
    from . import understanding as U

    if pipeline is None or pipeline.tokenizer is None:
        raise InvalidRequestError("enhancing with the checkpoint needs the loaded pipeline; pass pipeline=")
    model = pipeline.component("model")
    if getattr(model.language_model, "lm_head", None) is None:
        raise InvalidRequestError("this pipeline has no vocabulary head (lm_head) to write text with; enhance with "
                                  "an endpoint (--enhance-endpoint) instead", "enhance_endpoint")
    instruction = rewrite_instruction(task, prompt)
    if task == "i2v" and image is not None:
        from .processing import preprocess_image
        from .tasks import IMAGE_X2T_PRESET

        visual = preprocess_image(image, IMAGE_X2T_PRESET, vae=False, vit=True)
        vit = pipeline.component("vit")
        if vit is None:
            raise InvalidRequestError("enhancing an image-to-video prompt with the checkpoint needs the ViT: load "
                                      "the pipeline with task='video_edit'")
        embeds = U.encode_visual(vit, visual.vit_patches, visual.grid_thw)
        llm = pipeline.config.llm
        chat = U.build_prompt(pipeline.tokenizer, visual.grid_thw, "image", instruction, vit_embeds=embeds,
                              system=SYSTEM_PROMPT, spatial_merge_size=llm.spatial_merge_size,
                              tokens_per_second=llm.tokens_per_second)
        if pipeline.low_memory:
            import mlx.core as mx

            mx.eval(embeds)
            pipeline.release("vit")
    else:
        chat = text_prompt(pipeline.tokenizer, instruction)
    cache = U.prefill(model, chat)
    vocab = len(pipeline.tokenizer)
    ids = []
    for tok, _ in U.decode_tokens(model, cache, chat.last_token, chat.last_position, max_tokens,
                                  U.make_sampler(0.0), vocab):
        if tok == IM_END:
            break
        ids.append(tok)
    return _clean(pipeline.tokenizer.decode(ids, skip_special_tokens=True), "the checkpoint")


def text_prompt(tokenizer, user: str):
    """A text-only chat prompt (system + one user turn) as an understanding prompt: one causal text split."""
    from .sequence import Sequence, text_split
    from .understanding import UnderstandingPrompt

    text = (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    positions = np.broadcast_to(np.arange(len(ids), dtype=np.int64), (3, len(ids))).copy()
    return UnderstandingPrompt(Sequence([text_split(ids)]), positions, SYSTEM_PROMPT, user, "image")


# ------------------------------------------------------------------------------------------------ command line
def add_enhance_args(p) -> None:
    g = p.add_argument_group("prompt enhancement (docs/steering.md)")
    g.add_argument("--enhance-prompt", nargs="?", const="on", choices=MODES, default=None,
                   help="rewrite the prompt into a detailed caption before generating (t2i, t2v, i2v), with the "
                        "loaded checkpoint or --enhance-endpoint; a failed rewrite is an error, or with 'fallback' a "
                        "warning and the original prompt")
    add_endpoint_args(g)


def add_endpoint_args(g) -> None:
    """--enhance-endpoint and --enhance-model, of the commands (with --enhance-prompt) and of serve.py (where each
    request asks for enhancement). No flag takes the API key: a command line is visible to every user of the machine
    (ps, /proc) and kept in shell history, so the key comes from the environment only."""
    g.add_argument("--enhance-endpoint", metavar="URL",
                   help=f"OpenAI-compatible chat endpoint that rewrites (default ${ENV_BASE_URL}; none: the "
                        "checkpoint's own understanding expert)")
    g.add_argument("--enhance-model", metavar="NAME",
                   help=f"model name at the endpoint (default ${ENV_MODEL}); the API key comes from ${ENV_API_KEY} "
                        "only, never from a flag, which other users of the machine could read")


def enhancer_from_args(args) -> Optional[Enhancer]:
    """The checked enhancer of the command line, or None when --enhance-prompt is not given."""
    mode = getattr(args, "enhance_prompt", None)
    if mode is None:
        if getattr(args, "enhance_endpoint", None) or getattr(args, "enhance_model", None):
            raise InvalidRequestError("--enhance-endpoint / --enhance-model need --enhance-prompt", "enhance_prompt")
        return None
    return Enhancer.from_env(mode == "fallback", args.enhance_endpoint, args.enhance_model)


def server_enhancer(args) -> Enhancer:
    """serve.py's enhancer, checked at start-up: the flags of `add_endpoint_args`, else upstream's LANCE_REWRITE_*
    variables, else the loaded checkpoint; each request with enhance_prompt uses it."""
    enhancer = Enhancer.from_env(False, args.enhance_endpoint, args.enhance_model)
    if args.enhance_model and enhancer.endpoint is None:
        raise InvalidRequestError(f"--enhance-model names a model at an endpoint: add --enhance-endpoint URL (or set "
                                  f"{ENV_BASE_URL})", "enhance_model")
    return enhancer


def enhance_for_run(enhancer: Enhancer, request, metadata: dict, pipeline=None):
    """A command's rewrite: the request to generate; the enhanced prompt printed and put in `metadata` beside the
    original, or a note there when a `fallback` run keeps the original prompt."""
    request, revised = enhancer.apply(request, pipeline)
    if revised is None:
        metadata["revised_prompt_error"] = "enhancement failed; the original prompt was used"
        return request
    _stderr(f"[enhanced prompt, {enhancer.source}] {revised}")
    metadata.update(revised_prompt=revised, enhanced_by=enhancer.source)
    return request


def enhance_request(enhancer: Enhancer, request, fallback: bool, pipeline=None
                    ) -> Tuple[Any, Optional[str], Optional[str]]:
    """A server job's rewrite, `fallback` asked per request: (request to generate, enhanced prompt or None, the
    warning of a failed rewrite that kept the original prompt or None)."""
    warnings: List[str] = []
    request, revised = dataclasses.replace(enhancer, fallback=fallback).apply(request, pipeline, warnings.append)
    return request, revised, (warnings[0] if warnings else None)


def check_run(enhancer: Enhancer, task: str, shared_over_ranks: bool, batch_item: bool) -> None:
    """Refuse, before loading, what a run cannot enhance: a task without a rewrite rule; an output shared by several
    ranks (each would rewrite on its own); the checkpoint's rewrite inside a batch, whose pipelines drop the
    vocabulary head."""
    enhancer.check(task)
    if shared_over_ranks:
        raise InvalidRequestError("prompt enhancement runs in one process: launch without several ranks, or enhance "
                                  "the prompts first", "enhance_prompt")
    if batch_item and enhancer.needs_model:
        raise InvalidRequestError("the checkpoint enhances one prompt per run; for --prompts-file use "
                                  "--enhance-endpoint, or --parallel cfg", "enhance_prompt")


__all__ = ["CHECKPOINT_MAX_TOKENS", "EnhanceError", "Enhancer", "EXAMPLES", "TASKS", "add_endpoint_args",
           "add_enhance_args", "check_run", "enhance_for_run", "enhance_request", "enhancer_from_args",
           "rewrite_instruction", "rewrite_with_checkpoint", "rewrite_with_endpoint", "server_enhancer", "text_prompt"]
