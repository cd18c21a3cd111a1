"""The training loop: LoRA on a frozen base, AdamW with warm-up and a cosine or constant schedule, gradient
accumulation and clipping, seeded draws, checkpoints with resume, a JSONL loss log, validation images, and a clean
stop on Ctrl-C / SIGTERM (a checkpoint is written first)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .. import lora as L
from ..errors import GenerationError, InvalidRequestError
from . import data as D
from . import objective as O
from . import video_examples as VE
from .video_data import DEFAULT_NUM_FRAMES, FF2V_RATE, SAMPLE_FPS, VIDEO_TASKS

CHECKPOINTS = "checkpoints"
LOSS_LOG = "loss.jsonl"
STATE = "state.json"
OPTIMIZER = "optimizer.safetensors"


@dataclass
class Settings:
    """Everything that shapes a run; saved in each checkpoint and the adapter's metadata. Defaults follow upstream's
    scripts/sft_lance_generation.sh where it has one (lr 1e-4, min_lr 1e-6, AdamW betas (0.9, 0.95), eps 1e-15,
    weight decay 0, max_grad_norm 1.0 from config/config_factory.py) and mflux-like LoRA sizes otherwise."""

    task: str = "t2i"
    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup: int = 50
    schedule: str = "cosine"  # or "constant"
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-15
    max_grad_norm: float = 1.0
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: List[str] = field(default_factory=lambda: list(L.GEN_EXPERT_TARGETS))
    seed: int = 0
    checkpointing: bool = True
    text_drop: float = D.TEXT_DROP
    vision_drop: float = D.VISION_DROP
    timestep_shift: float = O.TIMESTEP_SHIFT
    mse_weight: float = O.MSE_WEIGHT
    ce_weight: float = O.CE_WEIGHT
    save_every: int = 100
    validate_every: int = 0
    resolution: int = 512
    # video tasks: the share of first-frame-to-video samples of t2v, and how clips are sampled
    ff2v_rate: float = FF2V_RATE
    num_frames: int = DEFAULT_NUM_FRAMES
    fps: int = SAMPLE_FPS


def learning_rate(s: Settings):
    """Linear warm-up from 0 to `lr`, then cosine decay to `min_lr` over the remaining steps, or constant."""
    warm = optim.linear_schedule(0.0, s.lr, max(s.warmup, 1))
    if s.schedule == "constant":
        rest = (lambda _: mx.array(s.lr, dtype=mx.float32))
    else:
        rest = optim.cosine_decay(s.lr, max(s.steps - s.warmup, 1), s.min_lr)
    return optim.join_schedules([warm, rest], [max(s.warmup, 1)])


class Stop:
    """Set by SIGINT / SIGTERM; the loop finishes the current step, checkpoints and returns."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._set)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _set(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, h in self._old.items():
            signal.signal(sig, h)
        return False


class Trainer:
    """Trains one LoRA adapter on `pipe.model` (a LancePipeline whose base weights stay frozen)."""

    def __init__(self, pipe, features: Sequence[D.Features], settings: Settings, out_dir, metadata: Dict = None,
                 validation: Optional[Callable[[int], List[Path]]] = None, log: Callable[[str], None] = print):
        self.pipe, self.model, self.features, self.s = pipe, pipe.model, list(features), settings
        self.out = Path(out_dir)
        self.metadata = dict(metadata or {})
        self.validation, self.log = validation, log
        self.vocab_limit = len(pipe.tokenizer) if pipe.tokenizer is not None else None
        self.prompts = (D.understanding_prompts(pipe.tokenizer, "video" if settings.task == "v2t" else "image")
                        if settings.task in ("i2t", "v2t") else None)
        self.model.freeze()
        paths = L.match_targets(self.model, settings.targets)
        if not paths:
            raise InvalidRequestError(f"no linear layer matches the LoRA targets {settings.targets}; patterns are "
                                      f"globs over paths like language_model.model.layers.0.mlp_moe_gen.up_proj",
                                      param="targets")
        factors = L.add_adapter(self.model, paths, settings.rank, settings.alpha, settings.dropout, seed=settings.seed)
        self.adapters = dict(zip(paths, factors))
        self.optimizer = optim.AdamW(learning_rate=learning_rate(settings), betas=[settings.beta1, settings.beta2],
                                     eps=settings.eps, weight_decay=0.0)
        self.step = 0
        self._grad_fn = nn.value_and_grad(self.model, self._loss)

    # ------------------------------------------------------------------------------------------------ one step
    def _loss(self, model, examples, draws):
        packed = O.pack(model, examples, draws, self.s.timestep_shift)
        r = O.losses(model, packed, self.vocab_limit, self.s.checkpointing, self.s.mse_weight, self.s.ce_weight)
        return r.loss, (r.mse if r.mse is not None else mx.array(0.0), r.ce if r.ce is not None else mx.array(0.0))

    def micro_batches(self, step: int) -> List[List[int]]:
        """Item indices of the `grad_accum` micro-batches of `step` (a pure function of seed and step)."""
        n_per_epoch = len(D.batch_order(self.features, self.s.batch_size, self.s.seed, 0))
        out = []
        for j in range(self.s.grad_accum):
            k = step * self.s.grad_accum + j
            epoch, pos = divmod(k, n_per_epoch)
            out.append(D.batch_order(self.features, self.s.batch_size, self.s.seed, epoch)[pos])
        return out

    def examples(self, step: int, micro: int, idx: Sequence[int]):
        """Examples and draws of one micro-batch, seeded by (seed, step, micro) so a resumed run repeats them."""
        key = mx.random.key(self.s.seed * 1_000_003 + step * 131 + micro)
        keys = mx.random.split(key, 2 * len(idx))
        exs, drs = [], []
        for n, i in enumerate(idx):
            rng = random.Random(f"{self.s.seed}/{step}/{micro}/{n}")
            if self.s.task in VIDEO_TASKS:
                ex = VE.build_example(self.features[i], self.s.task, rng, keys[2 * n], self.s.text_drop,
                                      self.s.vision_drop, self.prompts, self.s.ff2v_rate)
            else:
                ex = D.build_example(self.features[i], self.s.task, rng, keys[2 * n], self.s.text_drop,
                                     self.s.vision_drop, self.prompts)
            exs.append(ex)
            drs.append(O.draw(ex, keys[2 * n + 1]))
        return exs, drs

    def train_step(self, step: int) -> Dict[str, float]:
        mx.random.seed(self.s.seed * 7919 + step)  # LoRA dropout masks
        grads, totals = None, {"loss": 0.0, "mse": 0.0, "ce": 0.0}
        for j, idx in enumerate(self.micro_batches(step)):
            exs, drs = self.examples(step, j, idx)
            (loss, (mse, ce)), g = self._grad_fn(self.model, exs, drs)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(loss, grads)
            for k, v in (("loss", loss), ("mse", mse), ("ce", ce)):
                totals[k] += float(v.item()) / self.s.grad_accum
        if self.s.grad_accum > 1:
            grads = tree_map(lambda g: g / self.s.grad_accum, grads)
        grads, norm = optim.clip_grad_norm(grads, self.s.max_grad_norm)
        lr = float(learning_rate(self.s)(step))  # what the optimizer applies at its step count `step`
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        totals.update(grad_norm=float(norm.item()), lr=lr)
        return totals

    # ------------------------------------------------------------------------------------------------ state
    def adapter_info(self) -> L.AdapterInfo:
        meta = dict(self.metadata, task=self.s.task, rank=self.s.rank, steps=self.step, patterns=self.s.targets,
                    settings=asdict(self.s))
        return L.AdapterInfo(self.s.rank, self.s.alpha, self.s.dropout, sorted(self.adapters), meta)

    def save_checkpoint(self) -> Path:
        folder = self.out / CHECKPOINTS / f"step_{self.step:07d}"
        L.save_adapter(self.adapters, folder, self.adapter_info())
        opt = dict(tree_flatten(self.optimizer.state))
        tmp = folder / f".{OPTIMIZER}.tmp.safetensors"
        mx.save_safetensors(str(tmp), opt)
        os.replace(tmp, folder / OPTIMIZER)
        (folder / STATE).write_text(json.dumps({"step": self.step, "settings": asdict(self.s)}, indent=2) + "\n")
        return folder

    def resume(self, folder) -> None:
        """Load adapter factors, optimizer state and the step count of a checkpoint folder."""
        folder = Path(folder)
        state = json.loads((folder / STATE).read_text())
        tensors = mx.load(str(folder / L.ADAPTER_WEIGHTS))
        for p, a in self.adapters.items():
            a.lora_a = tensors[f"{L.PEFT_PREFIX}{p}.lora_A.weight"]
            a.lora_b = tensors[f"{L.PEFT_PREFIX}{p}.lora_B.weight"]
        self.optimizer.init(self.model.trainable_parameters())
        self.optimizer.state = tree_unflatten(list(mx.load(str(folder / OPTIMIZER)).items()))
        self.step = int(state["step"])
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)

    def _log_line(self, rec: Dict) -> None:
        with open(self.out / LOSS_LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------------------------------------ run
    def run(self, progress: bool = True) -> Dict:
        """Train until `steps` or a stop signal; returns {"step", "stopped", "adapter"}."""
        from tqdm import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        self.model.train()
        bar = tqdm(total=self.s.steps, initial=self.step, disable=not progress, unit="step", dynamic_ncols=True)
        stopped = None
        with Stop() as stop:
            while self.step < self.s.steps:
                t0 = time.perf_counter()
                rec = self.train_step(self.step)
                self.step += 1
                dt = time.perf_counter() - t0
                if not math.isfinite(rec["loss"]):
                    self.save_checkpoint()
                    raise GenerationError(f"the loss became {rec['loss']} at step {self.step}; lower --lr")
                rec = {"step": self.step, **{k: round(v, 6) for k, v in rec.items()}, "s_per_step": round(dt, 3)}
                self._log_line(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", s_step=f"{dt:.2f}")
                bar.update(1)
                if self.s.validate_every and self.validation and self.step % self.s.validate_every == 0:
                    self.model.eval()
                    self.validation(self.step)
                    self.model.train()
                if self.s.save_every and self.step % self.s.save_every == 0:
                    self.save_checkpoint()
                if stop.signal is not None:
                    stopped = stop.signal
                    break
        bar.close()
        ckpt = self.save_checkpoint()
        if stopped is None:
            L.save_adapter(self.adapters, self.out, self.adapter_info())
        self.model.eval()
        return {"step": self.step, "stopped": stopped, "checkpoint": ckpt,
                "adapter": None if stopped is not None else self.out}


def latest_checkpoint(out_dir) -> Optional[Path]:
    folder = Path(out_dir) / CHECKPOINTS
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.glob("step_*") if (p / STATE).is_file() and (p / OPTIMIZER).is_file())
    return done[-1] if done else None
