"""A local OpenAI-compatible server for Lance on MLX: images, videos and understanding over HTTP, with a web page."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checkpoints import UPSTREAM_REPO, hub_reference
from .cli import add_dtype_args, add_lora_arg, fail, flag_message
from .enhance import add_endpoint_args
from .errors import InvalidRequestError, LanceError
from .server.settings import MAX_BODY_MB, MAX_IMAGES, MAX_PIXELS, MAX_QUEUE, MAX_STEPS
from .tasks import MAX_FRAMES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    m = p.add_argument_group("model")
    m.add_argument("--model", default=UPSTREAM_REPO,
                   help=f"model folder or hub repo id (default {UPSTREAM_REPO}); the upstream layout holds both the "
                        "image and the video checkpoint, each loaded when a request needs it")
    m.add_argument("--video-model", default=None,
                   help="folder with the video checkpoint when --model holds only the image one (e.g. two "
                        "convert.py folders)")
    add_dtype_args(m)
    add_lora_arg(m)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network, "
                        "use --api-key then)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host is NAME (repeatable; '*' for any). By default only "
                        "localhost, 127.0.0.1, ::1 and --host are answered, so a web page cannot reach the server "
                        "through a DNS name it controls")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route except /health and the page itself")
    s.add_argument("--output-dir", type=Path, default=Path("lance-outputs"),
                   help="where outputs and the history database go (default ./lance-outputs)")
    s.add_argument("--allow-local-files", action="store_true",
                   help="let requests name local files (file:// URLs or paths) as inputs; off by default")
    add_endpoint_args(p.add_argument_group("prompt enhancement of requests with enhance_prompt (docs/steering.md)"))
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-queue", type=int, default=MAX_QUEUE,
                     help=f"jobs that may wait behind the running one; more get 429 (default {MAX_QUEUE})")
    lim.add_argument("--max-steps", type=int, default=MAX_STEPS, help=f"most denoising steps (default {MAX_STEPS})")
    lim.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                     help=f"most output pixels, width x height (default {MAX_PIXELS})")
    lim.add_argument("--max-frames", type=int, default=MAX_FRAMES, help=f"most video frames (default {MAX_FRAMES})")
    lim.add_argument("--max-images", type=int, default=MAX_IMAGES, help=f"largest n per image request "
                                                                           f"(default {MAX_IMAGES})")
    lim.add_argument("--max-memory", default=None, metavar="SIZE",
                     help="memory budget of one job, e.g. 24G: a request whose estimated peak (docs/memory.md) is "
                          "larger gets 400 naming a size or frame count that fits (default: the memory available "
                          "when the server starts, before any model loads)")
    lim.add_argument("--max-body-mb", type=int, default=MAX_BODY_MB,
                     help=f"largest request body in MiB (default {MAX_BODY_MB})")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p.parse_args(argv)


def build_config(args):
    from .enhance import server_enhancer
    from .server.settings import ServerConfig

    for name in ("max_queue", "max_steps", "max_pixels", "max_frames", "max_images", "max_body_mb"):
        if getattr(args, name) < 1:
            raise InvalidRequestError(f"--{name.replace('_', '-')} must be at least 1", name)
    if not 0 <= args.port <= 65535:
        raise InvalidRequestError(f"--port must be in [0, 65535], got {args.port}", "port")
    max_memory = None
    if args.max_memory is not None:
        from .memory_estimate import parse_bytes

        max_memory = parse_bytes(args.max_memory, "max_memory")
        if max_memory < 1:
            raise InvalidRequestError("--max-memory must be a positive size, e.g. 24G", "max_memory")
    for name in ("model", "video_model"):  # a hub id or address is checked now, before the server starts
        model = getattr(args, name)
        if model is not None and "/" in model and not Path(model).expanduser().exists():
            hub_reference(model)
    if args.lora:
        from .lora import check_lora_args

        check_lora_args(args.lora)  # a LanceError: main's one line, exit 2
    return ServerConfig(model=args.model, video_model=args.video_model, output_dir=args.output_dir, dtype=args.dtype,
                        compute_dtype=args.compute_dtype, loras=tuple(args.lora),
                        api_key=args.api_key, host=args.host, allowed_hosts=tuple(args.allow_host),
                        max_queue=args.max_queue, allow_local_files=args.allow_local_files,
                        max_body_bytes=args.max_body_mb * 2**20, max_steps=args.max_steps,
                        max_pixels=args.max_pixels, max_frames=args.max_frames, max_images=args.max_images,
                        enhancer=server_enhancer(args), max_memory=max_memory)


def main(argv=None) -> int:
    import uvicorn

    from .server import create_app
    from .server.guard import is_loopback
    from .server.lock import FolderInUse, OutputLock

    args = parse_args(argv)
    try:
        config = build_config(args)
    except LanceError as e:
        fail(flag_message(e), e.exit_code)
    try:  # before the port is bound and before any clean-up: a second server on this folder changes nothing
        lock = OutputLock(config.output_dir, args.port).acquire()
    except (FolderInUse, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"lance-mlx server on http://{args.host}:{args.port}/ (outputs and history in {config.output_dir})",
          file=sys.stderr)
    if not is_loopback(args.host) and not args.api_key:
        print(f"warning: --host {args.host} opens the server to the network without --api-key: anyone who can reach "
              "this port can run jobs and read every output", file=sys.stderr)
    if config.enhancer.endpoint:
        print(f"prompt enhancement by {config.enhancer.source}", file=sys.stderr)
    try:
        uvicorn.run(create_app(config, lock=lock), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
