"""Generation over several ranks with `mx.distributed`: guidance-, sequence- and batch-parallel splits."""

from __future__ import annotations

import argparse
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from . import sampler as S
from .config import SamplingParams
from .distributed_seq import ShardedNoiseBlock, assemble, latent_bounds, pad_rows, shard_bounds
from .errors import GenerationError, InvalidRequestError, LanceError
from .lance import BranchState, Lance
from .llm import Routing
from .sampler import Step, Velocity
from .sequence import TEXT_AND_VISION, Sequence

MODES = ("auto", "cfg", "seq", "batch")
# Guidance branches in a fixed order, the names of `sampler.guide`'s arguments: conditional, text dropped, text and
# visual conditioning dropped (Lance.prepare_generation).
BRANCHES = ("cond", "text", "all")


def world():
    """The global group of this launch (a group of one when the script was not started by `mlx.launch`)."""
    return mx.distributed.init()


# ------------------------------------------------------------------------------------------------------ layout
@dataclass(frozen=True)
class Layout:
    """How `groups * shards` ranks share one generation: guidance branch i runs on branch group i % groups; the
    noise block's tokens are split in `shards` contiguous pieces. Rank r is group r // shards, shard r % shards."""

    rank: int = 0
    groups: int = 1
    shards: int = 1

    @property
    def size(self) -> int:
        return self.groups * self.shards

    @property
    def group(self) -> int:
        return self.rank // self.shards

    @property
    def shard(self) -> int:
        return self.rank % self.shards

    def rank_of(self, group: int, shard: int) -> int:
        return group * self.shards + shard

    def describe(self) -> str:
        return f"{self.groups} guidance group(s) x {self.shards} token shard(s)"


def num_branches(params: SamplingParams) -> int:
    """Guidance branches a request prefills: 1, 2 with text guidance, 3 with image guidance (Lance.denoise)."""
    image = params.cfg_image > 1.0
    return 1 + int(params.cfg_text > 1.0 or image) + int(image)


def choose_layout(mode: str, size: int, rank: int, branches: int) -> Layout:
    """The split of `size` ranks: "cfg" one branch group per rank (several branches per group when there are more
    branches than ranks; with more ranks than branches the rest shard the tokens), "seq" all ranks shard the
    tokens, "auto" as many branch groups as divide the ranks, then shards."""
    if mode not in ("auto", "cfg", "seq"):
        raise InvalidRequestError(f"--parallel {mode} does not split one generation: use auto, cfg or seq")
    if mode == "seq" or size == 1:
        return Layout(rank, 1, size)
    if mode == "cfg":
        if branches < 2:
            raise InvalidRequestError("--parallel cfg runs the guidance branches on different ranks, but guidance "
                                      "is off (cfg <= 1): use --parallel seq or auto")
        groups = min(size, branches)
        if size % groups:
            raise InvalidRequestError(f"{size} ranks cannot share {branches} guidance branches evenly: use "
                                      f"--parallel seq or auto")
        return Layout(rank, groups, size // groups)
    groups = max(g for g in range(1, min(size, branches) + 1) if size % g == 0)
    return Layout(rank, groups, size // groups)


# ---------------------------------------------------------------------------------------------------- exchange
@dataclass
class Exchange:
    """Every collective of a generation, in one chain: each one's input depends on the previous one's output
    (`mx.depends`), so every rank evaluates them in the order they were built, whatever else its graph holds.
    Counts the bytes each rank receives (a ring all-gather sends as much as it receives) and, with `trace`, keeps
    (what, shape, dtype) of each call so runs can be compared across ranks."""

    group: object = None
    trace: Optional[List[Tuple[str, Tuple[int, ...], str]]] = None
    received: int = 0
    _last: Optional[mx.array] = field(default=None, repr=False)

    def __post_init__(self):
        self.group = self.group if self.group is not None else world()

    @property
    def size(self) -> int:
        return self.group.size()

    def gather(self, x: mx.array, what: str) -> mx.array:
        """all_gather of x (same shape on every rank): (size * x.shape[0], ...) in rank order."""
        if self._last is not None:
            x = mx.depends(x, self._last)
        out = mx.distributed.all_gather(x, group=self.group) if self.size > 1 else x
        self._last = out
        self.received += (self.size - 1) * x.nbytes
        if self.trace is not None:
            self.trace.append((what, tuple(x.shape), str(x.dtype)))
        return out

    def agree(self, values: np.ndarray, what: str) -> None:
        """Raise on every rank unless all ranks hold the same `values` (float32, exact below 2**24)."""
        rows = np.array(self.gather(mx.array(np.asarray(values, dtype=np.float32))[None], what))
        bad = [r for r in range(len(rows)) if not np.array_equal(rows[r], rows[0])]
        if bad:
            raise GenerationError(f"ranks {bad} differ from rank 0 in {what}: launch every rank with the same "
                                  "model, request and options")


# ------------------------------------------------------------------------------------------------- generation
class DistributedGeneration:
    """One request on `layout`: this rank's prefilled branch contexts and the velocity function for
    `sampler.denoise`. Which branches run, which rows travel and in which order depend only on the step's scales
    and the layout, the same on every rank, so every rank issues the same collectives (Exchange chains them)."""

    def __init__(self, model: Lance, seq: Sequence, params: SamplingParams, layout: Layout, exchange: Exchange):
        self.model, self.layout, self.exchange, self.params = model, layout, exchange, params
        image = params.cfg_image > 1.0
        cond, text = seq.cfg_branches() if (params.cfg_text > 1.0 or image) else (seq.branch(()), None)
        branches = [cond, text, seq.branch(TEXT_AND_VISION) if image else None]
        self.available = [i for i, b in enumerate(branches) if b is not None]
        noise = cond.noise
        if noise.kind != "latent":
            raise ValueError("the noise split must be a latent block")
        self.shape = noise.grid
        model.latent_pos.check(self.shape)
        self.block_len = len(noise)
        self.gen_mask = noise.gen_mask
        self.markers = model.embed_tokens([noise.ids[0], noise.ids[-1]])
        self.pos_rows = model.latent_pos.rows(self.shape).astype(model.dtype)
        # each rank prefills only the contexts of its group's branches
        self.states: Dict[int, BranchState] = {i: model._branch_state(branches[i]) for i in self.available
                                               if i % layout.groups == layout.group}
        mx.eval(self.markers, self.pos_rows, *[s.rope for s in self.states.values()])
        if self.block_len < layout.shards:
            raise InvalidRequestError(f"the noise block has {self.block_len} tokens, too few to split over "
                                      f"{layout.shards} ranks: use --parallel cfg or fewer ranks")
        self.bounds = shard_bounds(self.block_len, layout.shards)
        self.latent = latent_bounds(self.bounds, self.block_len)
        self.pad = max(b - a for a, b in self.latent)
        self.block = ShardedNoiseBlock(model.language_model.model, self.gen_mask, self.bounds, layout.shard)
        lens = [-1 if b is None else b.context_len for b in branches]
        ids = np.concatenate([s.ids for s in seq.splits]).astype(np.int64)
        self.fingerprint = [params.steps, self.block_len, layout.groups, layout.shards, *lens,
                            zlib.crc32(ids.tobytes()) & 0xFFFFFF, params.seed & 0xFFFFFF,
                            round(params.cfg_text * 1000), round(params.cfg_image * 1000)]

    def active(self, text_scale: float, image_scale: float) -> List[int]:
        """Branches a step needs, as Lance.velocity decides."""
        use_all = image_scale > 1.0 and 2 in self.available
        use_text = 1 in self.available and (text_scale > 1.0 or use_all)
        return [0] + ([1] if use_text else []) + ([2] if use_all else [])

    def _embed(self, x: mx.array, t) -> mx.array:
        """(1, N+2, hidden): VS marker, latent tokens, VE marker (Lance.noise_inputs)."""
        body = self.model.embed_latents(x, t, self.shape, self.pos_rows)
        return mx.concatenate([self.markers[:1], body, self.markers[1:]], axis=0)[None]

    def _hidden(self, h_in: mx.array, states: List[Optional[BranchState]], rows) -> List[Optional[mx.array]]:
        if self.layout.shards > 1:
            return self.block(h_in, states, self.exchange, rows)
        lm, routing = self.model.language_model.model, Routing(self.gen_mask)
        return [None if st is None else lm(h_in, rope=st.rope, routing=routing, cache=st.cache, attn="full",
                                           update_cache=False) for st in states]

    def velocity(self, x: mx.array, t, text_scale: float, image_scale: float) -> Velocity:
        """sampler.VelocityFn: this rank's branches on its tokens, then one all-gather of every velocity piece
        and the same guidance combine on every rank (so the latents stay equal on all ranks)."""
        lay = self.layout
        active = self.active(text_scale, image_scale)
        per_group = [[i for i in active if i % lay.groups == g] for g in range(lay.groups)]
        slots = max(len(p) for p in per_group)
        mine = per_group[lay.group]
        states = [self.states[i] for i in mine] + [None] * (slots - len(mine))

        def rows(j: int) -> List[int]:  # slot j of every shard of this rank's group in a gathered array
            return [lay.rank_of(lay.group, s) * slots + j for s in range(lay.shards)]

        hidden = self._hidden(self._embed(x, t), states, rows)
        lo, hi = self.block.latent_slice(self.block_len)
        pieces = [mx.zeros((self.pad, x.shape[-1]), mx.float32) if h is None else
                  pad_rows(self.model.llm2vae(h[0, lo:hi]).astype(mx.float32), self.pad) for h in hidden]
        gathered = self.exchange.gather(mx.stack(pieces), "velocities")  # (size * slots, pad, 48)
        v = {}
        for g, branches in enumerate(per_group):
            for j, i in enumerate(branches):
                v[i] = assemble(gathered, [lay.rank_of(g, s) * slots + j for s in range(lay.shards)], self.latent)
        return S.guide(v[0], v.get(1), v.get(2), text_scale, image_scale, self.params.renorm_min)


def denoise(model: Lance, seq: Sequence, params: SamplingParams, frozen: Optional[np.ndarray] = None,
            layout: Optional[Layout] = None, exchange: Optional[Exchange] = None) -> Iterator[Step]:
    """`Lance.denoise` over the ranks of `layout` (default: "auto" over the launch): the same start latents
    (`params.noise` or the seed), the same `sampler.denoise` loop on every rank; yields the same Steps everywhere."""
    exchange = exchange or Exchange()
    if layout is None:
        layout = choose_layout("auto", exchange.size, exchange.group.rank(), num_branches(params))
    if layout.size != exchange.size:
        raise GenerationError(f"the layout ({layout.describe()}) needs {layout.size} ranks, the launch has "
                              f"{exchange.size}")
    shape = seq.splits[seq.noise_index].grid
    model.latent_pos.check(shape)
    x0 = model.initial_noise(int(np.prod(shape)), params.seed, params.noise, shape)
    gen = DistributedGeneration(model, seq, params, layout, exchange)
    start = np.array(x0, dtype=np.float64)
    try:
        exchange.agree(np.array(gen.fingerprint + [start.sum(), np.square(start).sum()]), "request and start latents")
        yield from S.denoise(gen.velocity, x0, params, frozen, grid=shape)
    except RuntimeError as e:  # a collective failed: MLX's ring backend raises when a peer's connection drops
        if exchange.size == 1:
            raise
        raise GenerationError(f"rank {layout.rank}: the exchange with the other ranks failed ({e}); another rank "
                              "stopped (see its error) or the network went down") from e


# ------------------------------------------------------------------------------------------------ command line
# Options a --prompts-file line may not change: every item of a run shares the model and the split.
FIXED_OPTIONS = ("model", "dtype", "compute_dtype", "debug", "parallel", "prompts_file", "force")


def add_parallel_args(p, text_flag: str) -> None:
    """--parallel and --prompts-file of the generation commands (`text_flag`: the flag a plain line stands for)."""
    g = p.add_argument_group("several Macs (mlx.launch; docs/distributed.md)")
    g.add_argument("--parallel", choices=MODES, default="auto",
                   help="how the ranks of an `mlx.launch` share the work: cfg = one guidance branch per rank, seq = "
                        "the video's latent tokens split over the ranks, batch = the --prompts-file items spread "
                        "over the ranks; auto (default) = batch with --prompts-file, else guidance branches first "
                        "and the tokens over the remaining ranks. Without a launch everything runs here")
    g.add_argument("--prompts-file", type=Path,
                   help=f"run many items: one {text_flag} per line, or a JSON object of options per line (e.g. "
                        f'{{"{text_flag}": "...", "seed": 7, "out": "a.png"}}); item i takes --seed + i and writes '
                        "OUT's name with -000, -001, ... unless its line says otherwise")


def numbered(out: Path, i: int) -> Path:
    """`dir/name.png` -> `dir/name-003.png` (a frames folder `dir/name` -> `dir/name-003`)."""
    out = Path(out)
    return out.with_name(f"{out.stem}-{i:03d}{out.suffix}")


def read_prompts(path: Path, text_field: str, options: Dict[str, object]) -> List[Dict[str, object]]:
    """Items of a prompts file: a plain line is {text_field: line}; a JSON object line sets options by their
    argument names (dashes or underscores). Blank lines and lines starting with # are skipped."""
    return [item for _, item in read_numbered_prompts(path, text_field, options)]


def read_numbered_prompts(path: Path, text_field: str, options: Dict[str, object]) -> List[Tuple[int, Dict]]:
    """(line number, item) of each item of a prompts file (see read_prompts)."""
    import json

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRequestError(f"cannot read the prompts file {path}: {e}", "prompts_file") from None
    items = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("{"):
            items.append((n, {text_field: line}))
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{path}:{n}: not valid JSON ({e})", "prompts_file") from None
        if not isinstance(raw, dict):
            raise InvalidRequestError(f"{path}:{n}: not a JSON object of options", "prompts_file")
        item = {str(k).replace("-", "_"): v for k, v in raw.items()}
        bad = sorted(k for k in item if k not in options or k in FIXED_OPTIONS)
        if bad:
            raise InvalidRequestError(f"{path}:{n}: unknown or fixed option(s) {', '.join(bad)}; lines may set "
                                      f"{', '.join(sorted(set(options) - set(FIXED_OPTIONS)))}", "prompts_file")
        for k, v in item.items():
            if isinstance(options[k], Path) or k in ("image", "video", "out"):
                item[k] = None if v is None else Path(v)
            elif isinstance(v, list):
                item[k] = tuple(v)
        items.append((n, item))
    if not items:
        raise InvalidRequestError(f"the prompts file {path} has no items", "prompts_file")
    return items


def check_items(args, items: List[Tuple[int, Dict]], check_one) -> None:
    """Check every item of a prompts file before the first runs (`check_one(namespace)` raises what `run_one`
    would before loading): the first bad one is reported as FILE:LINE: its problem."""
    first_line: Dict[Path, int] = {}
    for i, (n, item) in enumerate(items):
        values = dict(vars(args), prompts_file=None, seed=args.seed + i, out=numbered(args.out, i))
        values.update(item)
        ns = argparse.Namespace(**values)
        try:
            check_one(ns)
        except LanceError as e:
            e.args, e.param = (f"{args.prompts_file}:{n}: {str(e)}",), None
            raise e from None
        out = Path(ns.out).expanduser().absolute()
        if out in first_line:
            raise InvalidRequestError(f"{args.prompts_file}:{n}: writes {ns.out}, as line {first_line[out]} does: give "
                                      "each line its own out", "prompts_file")
        first_line[out] = n


def run_prompts(args, run_one, text_field: str, check_one=None) -> int:
    """A generation command's run: one item, or every item of --prompts-file (this rank's share with batch), each
    checked first with `check_one` when given."""
    if args.prompts_file is None:
        if getattr(args, text_field) is None:
            raise InvalidRequestError(f"give --{text_field} (or --prompts-file)", text_field)
        if args.parallel == "batch" and world().size() > 1:
            raise InvalidRequestError("--parallel batch spreads the items of --prompts-file over the ranks; for "
                                      "one output use --parallel auto, cfg or seq", "parallel")
        return run_one(args)
    if getattr(args, text_field) is not None:
        raise InvalidRequestError(f"give --{text_field} or --prompts-file, not both", text_field)
    numbered_items = read_numbered_prompts(args.prompts_file, text_field, vars(args))
    if check_one is not None:
        check_items(args, numbered_items, check_one)
    items = [item for _, item in numbered_items]
    group = world()
    batch = args.parallel in ("auto", "batch")
    for i in range(group.rank(), len(items), group.size()) if batch else range(len(items)):
        item = dict(vars(args), prompts_file=None, batch_item=batch, seed=args.seed + i, out=numbered(args.out, i))
        item.update(items[i])
        run_one(argparse.Namespace(**item))
    return 0


_LOADED: Dict[Tuple, object] = {}  # the pipeline of the last item, reused by the next items of a prompts file


def load_key(model, task: str, dtype: str, compute_dtype: Optional[str] = None) -> tuple:
    """The key of a loaded pipeline in `_LOADED`: what the loading options depend on besides this rank."""
    return str(model), task, dtype, compute_dtype


def _pipeline(args, request):
    """The pipeline of this rank: a rank that never decodes (not rank 0 of a shared t2i / t2v output) loads with
    `low_memory`, which loads the VAE only for a decode, i.e. never; and no rank keeps the vocabulary head
    (`lm_head`, 0.6 GB in bf16), which generation never reads."""
    from . import cli
    from .pipeline import LancePipeline

    decodes = getattr(args, "batch_item", False) or world().rank() == 0 or request.task not in ("t2i", "t2v")
    options = cli.pipeline_options(args)
    options["low_memory"] = options["low_memory"] or not decodes
    key = load_key(args.model, request.task, args.dtype, args.compute_dtype)  # the options depend only on these
    if key not in _LOADED:
        _LOADED.clear()
        pipe = LancePipeline.from_pretrained(args.model, request=request, **options)
        pipe.model.language_model.lm_head = None
        _LOADED[key] = pipe
    pipe = _LOADED[key]
    pipe.check(request)
    return pipe


def generate_to_file(args, request, out: Path, encode_phase: str, metadata: dict) -> None:
    """`cli.generate_to_file` over a launch: one output shared by all ranks (rank 0 shows progress and writes it),
    or one item of this rank's share of a prompts file (each rank writes its own). A single process without a
    prompts file takes cli.generate_to_file unchanged."""
    from . import cli

    group = world()
    rank, batch_item = group.rank(), getattr(args, "batch_item", False)
    if group.size() == 1 and not batch_item:
        return cli.generate_to_file(args, request, out, encode_phase, metadata)
    role = cli.RunRole(shows=rank == 0, writes=batch_item or rank == 0,
                       label=f"[rank {rank}] " if group.size() > 1 else "")

    def split_denoise(pipe, plan):
        if batch_item:
            return pipe.denoise(plan)
        layout = choose_layout(args.parallel, group.size(), rank, num_branches(plan.params))
        if role.shows:
            print(f"[{group.size()} ranks] {layout.describe()}", file=sys.stderr)
        return denoise(pipe.model, plan.sequence, plan.params, plan.frozen, layout)

    cli.generate_to_file(args, request, out, encode_phase, metadata, load=_pipeline, denoise=split_denoise, role=role)
