"""Every exception lance-mlx raises on purpose is a `LanceError` (one line and exit 2 / 1 on the command line, 400 /
5xx on the server), unless it is on the commented allow-list below: internal invariants (a bug if they fire),
control flow, or errors a boundary (the request types of tasks.py) turns into a `LanceError`.

The test reads every `raise` of the package with `ast` and resolves what it raises, so a new plain `ValueError`
fails here until it is a `LanceError` subclass or is added to the allow-list with its reason."""

import ast
import builtins
import importlib
import typing
from collections import Counter
from pathlib import Path

import pytest

from lance_mlx import errors
from lance_mlx.errors import LanceError
from server_helpers import BASE_URL

PACKAGE = Path(errors.__file__).parent
ROOT = PACKAGE.parent

INTERNAL = "internal invariant: the callers pass values the package built or checked itself; firing is a bug"
MAPPED = "helper below the request types: tasks.py maps it to InvalidRequestError / InputNotFoundError"
LOW_LEVEL = "low-level model API (Lance.generate & co.): the pipeline checks requests (tasks.py) before it"
CONTROL = "control flow, not an error of the user's input"
HTTP = "the server's own HTTP reply (status, message and param chosen where it is raised)"

# (file, innermost function or "*" for any, what is raised) -> (how many such raises, None: any number; why it is
# not a LanceError)
ALLOWED = {
    # control flow
    ("cli.py", "fail", "SystemExit"): (1, CONTROL + ": exits with the one-line message already printed"),
    ("cli.py", "_raise_terminated", "Terminated"): (1, CONTROL + ": SIGTERM unwinding the stack"),
    ("cli.py", "_interval", "argparse.ArgumentTypeError"): (1, "argparse's type error: usage and exit 2"),
    ("server/jobs.py", "_check_cancel", "Cancelled"): (1, CONTROL + ": a cancelled job"),
    ("train/loop.py", "_set", "KeyboardInterrupt"): (1, CONTROL + ": a second Ctrl-C stops training at once"),
    ("server/jobs.py", "_run", "Cancelled"): (1, CONTROL + ": a cancelled job"),
    ("server/jobs.py", "submit", "QueueFull"): (2, HTTP + ": 429"),
    ("server/guard.py", "counted", "BodyTooLarge"): (1, HTTP + ": 413"),
    ("server/jobs.py", "submit", "Unavailable"): (2, HTTP + ": 507 / 503 while the storage or the worker is down"),
    ("server/app.py", "*", "ApiError"): (None, HTTP),
    ("server/admission.py", "check", "ApiError"): (1, HTTP + ": 400 insufficient_memory, naming what fits"),
    ("server/app.py", "*", "failure"): (None, HTTP + " (create_app's `failure` builds the ApiError of a failed job)"),
    ("server/history.py", "update", "KeyError"): (1, INTERNAL + " (column names are the server's)"),
    # boundaries that map to LanceError
    ("processing.py", "get_preset", "ValueError"): (1, MAPPED + " (check_preset)"),
    ("processing.py", "load_image", "FileNotFoundError"): (1, MAPPED + " (load_image_input)"),
    ("processing.py", "load_image", "ValueError"): (4, MAPPED + " (load_image_input)"),
    ("processing.py", "check_image_size", "ValueError"): (2, MAPPED + " (load_image_input)"),
    ("processing.py", "_to_frames", "ValueError"): (4, MAPPED + " (load_video_input, latent_frames)"),
    ("processing.py", "sample_frame_indices", "ValueError"): (2, MAPPED + " (load_video_input)"),
    ("media.py", "_write_image", "ValueError"): (1, "media.check_output refuses other names before any work"),
    ("media.py", "save_video", "ValueError"): (1, "media.check_output refuses other names before any work"),
    ("media.py", "_encode_h264", "ValueError"): (1, INTERNAL + " (frames come from the VAE decode)"),
    ("media.py", "_encode_h264", "OSError"): (1, "re-raised as WriteError by atomic_output (a full disk)"),
    ("conversion.py", "_write_safetensors", "OSError"): (1, "re-raised as WriteError by convert (a full disk)"),
    ("publish.py", "_flagged_rename", "OSError"): (1, "re-raised as WriteError / OutputTakenError by atomic_output"),
    ("publish.py", "rename_noreplace", "FileExistsError"): (1, "re-raised as OutputTakenError by atomic_output"),
    ("lance.py", "_prompt_ids", "ValueError"): (4, LOW_LEVEL),
    ("lance.py", "_latent_shape", "ValueError"): (1, LOW_LEVEL),
    ("lance.py", "initial_noise", "ValueError"): (1, LOW_LEVEL),
    ("sampler.py", "timesteps", "ValueError"): (1, LOW_LEVEL + " (SamplingParams checks steps)"),
    ("solvers.py", "make_solver", "ValueError"): (1, LOW_LEVEL + " (SamplingParams checks the sampler)"),
    # internal invariants
    ("lance.py", "embed_split", "ValueError"): (1, INTERNAL),
    ("lance.py", "prepare_generation", "ValueError"): (1, INTERNAL),
    ("distributed.py", "__init__", "ValueError"): (1, INTERNAL),
    ("distributed_seq.py", "shard_bounds", "ValueError"): (1, INTERNAL),
    ("llm.py", "attend", "ValueError"): (2, INTERNAL),
    ("llm.py", "mrope_cos_sin", "ValueError"): (1, INTERNAL + " (the config's rope sections)"),
    ("processing.py", "prepare_vit_patches", "ValueError"): (1, INTERNAL),
    ("processing.py", "patchify", "ValueError"): (1, INTERNAL),
    ("sequence.py", "system_prompt_ids", "ValueError"): (1, INTERNAL),
    ("sequence.py", "__post_init__", "ValueError"): (2, INTERNAL),
    ("sequence.py", "latent_split", "ValueError"): (1, INTERNAL),
    ("sequence.py", "chat_sequence", "ValueError"): (1, INTERNAL),
    ("sequence.py", "noise_index", "ValueError"): (1, INTERNAL),
    ("understanding.py", "build_prompt", "ValueError"): (1, INTERNAL + " (the ViT grid comes from processing)"),
    ("understanding.py", "_run", "ValueError"): (1, INTERNAL),
    ("vae_blocks.py", "__init__", "ValueError"): (1, INTERNAL),
    ("vae_wan22.py", "__init__", "ValueError"): (1, INTERNAL),
    ("vit.py", "__init__", "ValueError"): (2, INTERNAL + " (ViTConfig values)"),
    ("vit.py", "__call__", "ValueError"): (2, INTERNAL),
    ("vit.py", "_as_grids", "ValueError"): (1, INTERNAL),
}


def _module_of(path: Path):
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return importlib.import_module(name)


def _imported_names(tree: ast.Module, module) -> dict:
    """Every `from X import Y` of the file (also inside functions), resolved to the objects."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), module.__package__) \
                if node.level else node.module
            try:
                source = importlib.import_module(base)
            except ImportError:
                continue
            for alias in node.names:
                if hasattr(source, alias.name):
                    names[alias.asname or alias.name] = getattr(source, alias.name)
    return names


class _Resolver:
    def __init__(self, path: Path, module=None):
        self.tree = ast.parse(path.read_text())
        self.module = module or _module_of(path)
        self.names = {**vars(builtins), **_imported_names(self.tree, self.module), **vars(self.module)}

    def value(self, expr):
        """The object a Name / Attribute chain stands for in the module, or None."""
        if isinstance(expr, ast.Name):
            return self.names.get(expr.id)
        if isinstance(expr, ast.Attribute):
            base = self.value(expr.value)
            return getattr(base, expr.attr, None) if base is not None else None
        return None

    def raised(self, exc, scope: list) -> list:
        """The classes `raise exc` can raise (an empty list when unknown); `scope` is the chain of enclosing nodes."""
        if isinstance(exc, ast.Call):
            f = exc.func
            if isinstance(f, ast.Call) and isinstance(f.func, ast.Name) and f.func.id == "type" and f.args:
                return self.raised(f.args[0], scope)  # type(e)(...): the type of a caught error
            obj = self.value(f)
            if isinstance(obj, type):
                return [obj]
            if callable(obj):  # a function that builds the error: its return annotation
                hint = typing.get_type_hints(obj).get("return")
                return [hint] if isinstance(hint, type) else []
            return []
        if isinstance(exc, ast.Name):
            for node in reversed(scope):  # `except T as e: ... raise e`, or `e = SomeError(...)` in the function
                if isinstance(node, ast.ExceptHandler) and node.name == exc.id and node.type is not None:
                    types = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
                    found = [self.value(t) for t in types]
                    return found if all(isinstance(t, type) for t in found) else []
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    for sub in ast.walk(node):
                        if isinstance(sub, ast.Assign) and any(isinstance(t, ast.Name) and t.id == exc.id
                                                               for t in sub.targets):
                            return self.raised(sub.value, scope)
                    break
            obj = self.value(exc)
            return [obj] if isinstance(obj, type) else []
        return []


def _display(exc) -> str:
    target = exc.func if isinstance(exc, ast.Call) else exc
    if isinstance(target, ast.Call):
        target = target.func
    return ast.unparse(target)


def raise_sites():
    """(file, function, display name, raised classes, line) of every `raise X` / `raise X(...)` of the package."""
    sites = []
    for path in sorted(PACKAGE.rglob("*.py")):
        resolver = _Resolver(path)

        def visit(node, scope):
            if isinstance(node, ast.Raise) and node.exc is not None:
                func = next((s.name for s in reversed(scope) if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))),
                            "<module>")
                sites.append((str(path.relative_to(PACKAGE)), func, _display(node.exc),
                              resolver.raised(node.exc, scope), node.lineno))
            for child in ast.iter_child_nodes(node):
                visit(child, scope + [node])

        visit(resolver.tree, [])
    return sites


def test_every_raise_is_a_lance_error_or_allowed():
    sites = raise_sites()
    assert len(sites) > 200  # the walk sees the whole package
    unexpected, allowed = [], Counter()
    for file, func, name, classes, line in sites:
        if classes and all(issubclass(c, LanceError) for c in classes):
            continue
        key = (file, func, name) if (file, func, name) in ALLOWED else (file, "*", name)
        if key in ALLOWED:
            allowed[key] += 1
        else:
            unexpected.append(f"lance_mlx/{file}:{line} in {func}: raise {name} "
                              f"({', '.join(c.__name__ for c in classes) or 'unresolved'})")
    assert not unexpected, ("raises that are not LanceError subclasses; make them one (errors.py), or add them to "
                            "ALLOWED with the reason:\n" + "\n".join(unexpected))
    counts = {k: n for k, (n, _) in ALLOWED.items() if n is not None}
    assert {k: n for k, n in allowed.items() if k in counts} == counts, \
        "allow-list counts differ: a raise was added to or removed from an allowed function"


@pytest.mark.parametrize("source", [
    "class E(ValueError):\n    pass\n\n\ndef f():\n    raise E('x')\n",
    "def f(x):\n    if x:\n        raise ValueError('bad input')\n",
    "def f(x):\n    try:\n        x()\n    except KeyError as e:\n        raise e\n",
])
def test_the_walk_flags_a_plain_error(source, tmp_path, monkeypatch):
    """A new plain error resolves to a non-LanceError class (the check above is not vacuous)."""
    (tmp_path / "probe_errors_mod.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    r = _Resolver(tmp_path / "probe_errors_mod.py", importlib.import_module("probe_errors_mod"))
    sites = []

    def visit(node, scope):
        if isinstance(node, ast.Raise):
            sites.append(r.raised(node.exc, scope))
        for child in ast.iter_child_nodes(node):
            visit(child, scope + [node])

    visit(r.tree, [])
    assert sites and all(classes and not issubclass(classes[0], LanceError) for classes in sites)


def test_checkpoint_and_config_errors_are_weights_errors():
    from lance_mlx.config import ConfigValueError
    from lance_mlx.torch_checkpoint import CheckpointError, UnsafeCheckpointError
    from lance_mlx.vae_wan22 import VAEInputError, WeightsMismatchError

    for cls in (CheckpointError, UnsafeCheckpointError, WeightsMismatchError, ConfigValueError):
        assert issubclass(cls, errors.WeightsError) and issubclass(cls, ValueError)
    assert issubclass(VAEInputError, errors.InvalidRequestError)
    assert issubclass(errors.WeightsNotFoundError, FileNotFoundError)


# How each kind of error ends, the same in every front end: the command-line scripts (cli.main_guard: exit code)
# and the server (app.lance_error while a request is parsed, the job's failure while it runs: HTTP status).
OUTCOMES = {
    errors.InvalidRequestError: (2, 400),
    errors.InputNotFoundError: (2, 400),
    errors.InvalidTypeError: (2, 400),
    errors.WeightsError: (2, 500),  # on a server, the model folder is the operator's to fix, not the client's
    errors.OutputError: (2, 507),
    errors.WriteError: (1, 507),
    errors.GenerationError: (1, 500),
}


@pytest.mark.parametrize("cls", list(OUTCOMES), ids=lambda c: c.__name__)
def test_cli_and_server_map_errors_alike(cls, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from lance_mlx import cli
    from lance_mlx.server import create_app
    from lance_mlx.server.app import lance_error
    from lance_mlx.server.settings import ServerConfig

    code, status = OUTCOMES[cls]

    def run(args):
        raise cls("what went wrong", "prompt")

    with pytest.raises(SystemExit) as e:
        cli.main_guard(run, lambda argv: type("Args", (), {"debug": False})(), [])
    assert e.value.code == code and capsys.readouterr().err == "error: what went wrong\n"
    parsed = lance_error(cls("what went wrong"))
    assert parsed.status == 400 if status == 400 else parsed.status >= 500

    def loader(kind):
        raise cls("what went wrong")

    config = ServerConfig(model=str(tmp_path / "model"), output_dir=tmp_path / "out", dtype="float32",
                          max_memory=2**50)  # no model there: the full-size estimate is not what this test is about
    with TestClient(create_app(config, loader), base_url=BASE_URL) as client:
        r = client.post("/v1/images/generations", json={"prompt": "a fox", "size": "32x32", "steps": 1})
    assert r.status_code == status and "what went wrong" in r.json()["error"]["message"], r.text
