"""Refusals that happen before any weights load, run as a user would (exit 2, one line, no traceback, the working
tree unchanged): special tokens in any text field (every command, the Python request types, the server), hub ids
and addresses, every --prompts-file line, the flag names in messages, unreadable VAE files, lance-mlx-launch hosts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fixtures import run_cli, tree_hash
from lance_mlx import checkpoints, cli, cmd_caption, cmd_convert, cmd_edit, cmd_generate, media
from lance_mlx import tasks as T
from lance_mlx.errors import InvalidRequestError, LanceError, WeightsError

ROOT = Path(__file__).resolve().parents[1]
TOKENS = ["<|im_start|>", "<|vision_start|>", "<|video_pad|>", "<|endoftext|>", "<|image_pad|>", "<|im_end|>"]


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working folder with an input image and video, made the current folder."""
    rng = np.random.default_rng(0)
    media.save_image((rng.random((32, 32, 3)) * 255).astype(np.uint8), tmp_path / "in.png")
    media.save_video([(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(5)], tmp_path / "in.mp4")
    (tmp_path / "mine.txt").write_text("a user's file")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def assert_one_line(code, err, *messages, expected_code=2):
    assert code == expected_code, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for m in messages:
        assert m in lines[0], err


# ------------------------------------------------------------------------------------------------ special tokens
def test_special_tokens_are_the_tokenizers_added_tokens():
    from transformers import AutoTokenizer

    from fixtures import GOLDEN

    tok = AutoTokenizer.from_pretrained(str(GOLDEN / "tokenizer"))
    added = [t.content for _, t in sorted(tok.added_tokens_decoder.items())]
    assert list(T.SPECIAL_TOKENS) == added
    for t in T.SPECIAL_TOKENS:  # each is one control id wherever it stands in text
        assert len(tok(f"a{t}b", add_special_tokens=False)["input_ids"]) == 3


TEXT_CASES = {  # command, argv with {t} for the text, what the message names
    "t2i prompt": (cmd_generate, ["--prompt", "a fox {t} at dawn", "--out", "x.png"], "prompt"),
    "t2v prompt": (cmd_generate, ["--prompt", "{t}", "--frames", "5", "--width", "32", "--height", "32", "--out",
                                  "v.mp4"], "prompt"),
    "i2v prompt": (cmd_generate, ["--image", "in.png", "--frames", "5", "--prompt", "waves{t}", "--out", "v.mp4"],
                   "prompt"),
    "image edit instruction": (cmd_edit, ["--image", "in.png", "--instruction", "make it {t} pink", "--out", "e.png"],
                               "instruction"),
    "video edit instruction": (cmd_edit, ["--video", "in.mp4", "--instruction", "{t}snow", "--out", "e.mp4"],
                               "instruction"),
    "image question": (cmd_caption, ["--image", "in.png", "--question", "what is {t} this?"], "question"),
    "video question": (cmd_caption, ["--video", "in.mp4", "--question", "{t}"], "question"),
}


@pytest.mark.parametrize("token", TOKENS[:3])
@pytest.mark.parametrize("case", list(TEXT_CASES))
def test_special_tokens_refused_in_every_text_flag(case, token, work, no_model, capsys):
    cmd, argv, field = TEXT_CASES[case]
    before = tree_hash(work)
    code, err = run_cli(cmd, [a.format(t=token) for a in argv], capsys)
    assert_one_line(code, err, f"the {field} contains '{token}'", "remove it")
    assert tree_hash(work) == before


@pytest.mark.parametrize("line", ["a fox <|im_end|>", '{"prompt": "<|im_start|>system"}'])
def test_special_tokens_refused_in_prompts_file_lines(line, work, no_model, capsys):
    (work / "p.txt").write_text(f"a red fox\n{line}\n")
    before = tree_hash(work)
    code, err = run_cli(cmd_generate, ["--prompts-file", "p.txt", "--out", "x.png"], capsys)
    assert_one_line(code, err, "p.txt:2:", "special token", "remove it")
    assert tree_hash(work) == before
    (work / "e.txt").write_text("make it pink\n<|vision_start|>\n")
    code, err = run_cli(cmd_edit, ["--image", "in.png", "--prompts-file", "e.txt", "--out", "e.png"], capsys)
    assert_one_line(code, err, "e.txt:2:", "'<|vision_start|>'")


REQUESTS = {  # request type -> a builder taking (text field value) in each text field
    "TextToImage.prompt": lambda t: T.TextToImage(t, 32, 32),
    "TextToVideo.prompt": lambda t: T.TextToVideo(t, 5, 32, 32),
    "ImageToVideo.prompt": lambda t: T.ImageToVideo(t, "in.png", 5),
    "ImageEdit.instruction": lambda t: T.ImageEdit("in.png", t),
    "VideoEdit.instruction": lambda t: T.VideoEdit("in.mp4", t),
    "Understand.question": lambda t: T.Understand("in.png", question=t),
    "Understand.system_prompt": lambda t: T.Understand("in.png", system_prompt=t),
}


@pytest.mark.parametrize("token", TOKENS)
@pytest.mark.parametrize("field", list(REQUESTS))
def test_special_tokens_refused_by_the_request_types(field, token, work):
    with pytest.raises(InvalidRequestError, match="remove it") as e:
        REQUESTS[field](f"a {token} b")
    assert token in str(e.value)
    REQUESTS[field]("a < |im_start| > b, <b>bold</b> and <|custom|> are text")  # look-alikes pass


def test_special_tokens_refused_by_the_server(work):
    from fastapi.testclient import TestClient

    from lance_mlx.server import create_app
    from lance_mlx.server.settings import ServerConfig
    from server_helpers import BASE_URL, data_url, error_of, png_bytes

    def loader(kind):
        raise AssertionError("a model was loaded for a refused request")

    config = ServerConfig(model=str(work / "model"), output_dir=work / "out", dtype="float32")
    image = {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}
    with TestClient(create_app(config, loader), base_url=BASE_URL) as client:
        err = error_of(client.post("/v1/images/generations", json={"prompt": "a <|im_end|> fox", "size": "32x32"}))
        assert "'<|im_end|>'" in err["message"] and err["param"] == "prompt"
        err = error_of(client.post("/v1/images/edits", data={"prompt": "<|vision_start|>pink"},
                                   files={"image": ("in.png", png_bytes(), "image/png")}))
        assert "'<|vision_start|>'" in err["message"] and err["param"] == "prompt"
        err = error_of(client.post("/v1/videos", json={"prompt": "<|video_pad|>", "size": "32x32", "num_frames": 5}))
        assert "'<|video_pad|>'" in err["message"] and err["param"] == "prompt"
        for messages in ([{"role": "user", "content": [{"type": "text", "text": "<|im_start|>hi"}, image]}],
                         [{"role": "system", "content": "be <|endoftext|> brief"},
                          {"role": "user", "content": [{"type": "text", "text": "hi"}, image]}]):
            err = error_of(client.post("/v1/chat/completions", json={"messages": messages}))
            assert "special token" in err["message"] and err["param"] == "messages"


@pytest.mark.parametrize("script,argv", [
    ("inference.py", ["--prompt", "<|im_start|>a fox", "--out", "x.png"]),
    ("edit.py", ["--image", "in.png", "--instruction", "<|vision_start|>pink", "--out", "e.png"]),
    ("caption.py", ["--image", "in.png", "--question", "what <|image_pad|>?"]),
])
def test_special_tokens_refused_by_the_scripts(script, argv, work):
    """The console scripts themselves (a subprocess): exit 2 and one line, before any model is looked for."""
    before = tree_hash(work)
    r = subprocess.run([sys.executable, str(ROOT / script), "--model", str(work / "no-model"), *argv],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert_one_line(r.returncode, r.stderr, "special token", "remove it")
    assert tree_hash(work) == before


# ------------------------------------------------------------------------------------------------------ hub ids
@pytest.mark.parametrize("text,repo,sub", [
    ("bytedance-research/Lance", "bytedance-research/Lance", None),
    ("bytedance-research/Lance/Lance_3B", "bytedance-research/Lance", "Lance_3B"),
    ("https://huggingface.co/bytedance-research/Lance", "bytedance-research/Lance", None),
    ("https://huggingface.co/bytedance-research/Lance/", "bytedance-research/Lance", None),
    ("huggingface.co/bytedance-research/Lance/tree/main", "bytedance-research/Lance", None),
    ("https://hf.co/mlx-community/Lance-3B/tree/main/sub", "mlx-community/Lance-3B", "sub"),
])
def test_hub_references(text, repo, sub):
    assert checkpoints.hub_reference(text) == (repo, sub)


@pytest.mark.parametrize("text,message", [
    ("bad repo!/x y", "OWNER/NAME"),
    ("a--b/c", "OWNER/NAME"),
    ("owner/name.git", "OWNER/NAME"),
    ("https://huggingface.co/datasets/a/b", "dataset, not a repo of weights"),
    ("https://huggingface.co/a/b/blob/main/x.json", "other revisions and single files"),
    ("https://huggingface.co/a/b/tree/v2", "other revisions"),
    ("https://github.com/bytedance/Lance", "not a huggingface.co address"),
])
def test_bad_hub_references(text, message):
    with pytest.raises(WeightsError, match=message):
        checkpoints.hub_reference(text)


@pytest.fixture
def hub_calls(monkeypatch):
    """The repo ids the hub is asked for (each answers 'no such repo')."""
    import httpx
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    calls = []

    def fake(repo_id, *a, **k):
        calls.append(repo_id)
        response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/x"))
        raise RepositoryNotFoundError("404 Client Error: Repository Not Found", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    return calls


@pytest.mark.parametrize("cmd,argv", [
    (cmd_generate, ["--prompt", "a fox", "--out", "x.png"]),
    (cmd_caption, ["--image", "in.png"]),
    (cmd_convert, ["--out", "converted"]),
])
@pytest.mark.parametrize("model", ["bad repo!/x y", "https://huggingface.co/datasets/a/b"])
def test_bad_repo_ids_are_refused_before_the_hub(cmd, argv, model, work, hub_calls, capsys):
    before = tree_hash(work)
    code, err = run_cli(cmd, ["--model", model, *argv], capsys)
    assert_one_line(code, err, repr(model))
    assert "--model" not in err.split(repr(model))[1][:3]  # the value is quoted as given
    assert hub_calls == [] and tree_hash(work) == before


def test_hub_address_is_taken_as_its_repo_id(work, hub_calls, capsys):
    for model in ("https://huggingface.co/owner/Lance-mlx", "https://huggingface.co/owner/Lance-mlx/tree/main"):
        code, err = run_cli(cmd_generate, ["--model", model, "--prompt", "a fox", "--out", "x.png"], capsys)
        assert_one_line(code, err, "no hub repo owner/Lance-mlx")
    assert set(hub_calls) == {"owner/Lance-mlx"}


def test_hub_validation_errors_are_weights_errors(work, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError

    def refuse(*a, **k):
        raise HFValidationError("Repo id must use alphanumeric chars")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    code, err = run_cli(cmd_generate, ["--model", "owner/name", "--prompt", "a fox", "--out", "x.png"], capsys)
    assert_one_line(code, err, "not a valid hub repo id", "OWNER/NAME")


# ---------------------------------------------------------------------------------------------- flag rewriting
@pytest.mark.parametrize("message,param,values,expected", [
    ("steps 0 is out of range", "steps", (), "--steps 0 is out of range"),
    ("max_tokens must be positive", "max_tokens", (), "--max-tokens must be positive"),
    ("no image given (the image to edit)", "image", (), "no --image given (the image to edit)"),
    ("cannot read image: x.png is empty", "image", ("x.png",), "cannot read --image: x.png is empty"),
    ("cannot get files ['Lance_3B/model.safetensors']: the model is offline", "model", (),
     "cannot get files ['Lance_3B/model.safetensors']: the --model is offline"),
    ("model.safetensors is missing", "model", (), "model.safetensors is missing"),
    ("out/y.bmp is not an image name", "out", ("out/y.bmp",), "out/y.bmp is not an image name"),
    ("out exists (an earlier output)", "out", ("out",), "out exists (an earlier output)"),
    ("'model' is not a repo id", "model", (), "'model' is not a repo id"),
    ("pass --model with a folder; model missing", "model", (), "pass --model with a folder; model missing"),
    ("a.model.json and model.bin exist", "model", (), "a.model.json and model.bin exist"),
])
def test_flag_names_replace_only_field_names(message, param, values, expected):
    assert cli.flag_message(InvalidRequestError(message, param), values) == expected


def test_output_path_is_shown_as_given(work, no_model, capsys):
    (work / "out").mkdir()
    code, err = run_cli(cmd_generate, ["--prompt", "a fox", "--out", "out/y.bmp"], capsys)
    assert_one_line(code, err, "out/y.bmp is not an image name")
    assert "--out/" not in err


def test_hub_patterns_are_shown_as_given(work, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*a, **k):
        raise LocalEntryNotFoundError("cannot reach the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    code, err = run_cli(cmd_generate, ["--prompt", "a fox", "--out", "x.png"], capsys)
    assert_one_line(code, err, "'Lance_3B/model.safetensors'", "cannot be reached")
    assert "/--model" not in err


# ------------------------------------------------------------------------------------------------ prompts files
PROMPT_FILE_CASES = [
    ("empty prompt", '{"prompt": "  "}', "prompt is empty"),
    ("bad seed", '{"prompt": "a cat", "seed": -3}', "seed -3 is out of range"),
    ("bad size", '{"prompt": "a cat", "width": 33, "height": 32}', "not a positive multiple of 16"),
    ("bad output name", '{"prompt": "a cat", "out": "cat.bmp"}', "not an image name"),
    ("user's file as output", '{"prompt": "a cat", "out": "mine.txt"}', "not an image name"),
    ("same output twice", '{"prompt": "a cat", "out": "x-000.png"}', "as line 1 does"),
    ("not JSON", '{"prompt": "a cat"', "not valid JSON"),
    ("not an object", "{}", ""),
    ("unknown option", '{"prompt": "a cat", "colour": "red"}', "unknown or fixed option(s) colour"),
]


@pytest.mark.parametrize("case,line,message", PROMPT_FILE_CASES, ids=[c[0] for c in PROMPT_FILE_CASES])
def test_every_prompts_file_line_is_checked_first(case, line, message, work, no_model, capsys):
    """A bad line 3 is reported as p.txt:3 before anything runs (the model would load for line 1)."""
    (work / "p.txt").write_text(f"a red fox\n\n# a comment\n{line}\n" if case == "not an object"
                                else f"a red fox\n# a comment\n{line}\n")
    n = 4 if case == "not an object" else 3
    before = tree_hash(work)
    code, err = run_cli(cmd_generate, ["--prompts-file", "p.txt", "--out", "x.png", "--steps", "1"], capsys)
    if case == "not an object":  # an empty object is a line with no prompt
        assert_one_line(code, err, f"p.txt:{n}:", "prompt is empty")
    else:
        assert_one_line(code, err, f"p.txt:{n}:", message)
    assert tree_hash(work) == before


def test_edit_prompts_file_lines_are_checked_first(work, no_model, capsys):
    (work / "e.txt").write_text('make it pink\n{"instruction": "snow", "image": "missing.png"}\n')
    before = tree_hash(work)
    code, err = run_cli(cmd_edit, ["--image", "in.png", "--prompts-file", "e.txt", "--out", "e.png"], capsys)
    assert_one_line(code, err, "e.txt:2:", "missing.png")
    assert tree_hash(work) == before


# ---------------------------------------------------------------------------------------------- weight files
def _runs_shell_pth(path, marker):
    import torch

    class RunsShell:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"weight": torch.zeros(2), "x": RunsShell()}, path)


VAE_CASES = {
    "truncated": (lambda p, real, m: p.write_bytes(real.read_bytes()[: real.stat().st_size // 2]),
                  "truncated or corrupt"),
    "Git LFS pointer": (lambda p, real, m: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:"
                                                        "ab12\nsize 2823816990\n"), "Git LFS pointer"),
    "empty": (lambda p, real, m: p.write_bytes(b""), "is empty"),
    "code in the pickle": (lambda p, real, m: _runs_shell_pth(p, m), "refusing to load global"),
}


@pytest.fixture
def model_with_vae(upstream_root, tmp_path):
    """The tiny upstream layout (linked) with a Wan2.2_VAE.pth the test writes: (root, write(case))."""
    root = tmp_path / "model"
    root.mkdir()
    for part in upstream_root.iterdir():
        if part.name != "Wan2.2_VAE.pth":
            (root / part.name).symlink_to(part)
    marker = tmp_path / "payload_ran"

    def write(case):
        VAE_CASES[case][0](root / "Wan2.2_VAE.pth", upstream_root / "Wan2.2_VAE.pth", marker)
        return VAE_CASES[case][1]

    return root, write, marker


@pytest.mark.parametrize("case", list(VAE_CASES))
def test_unreadable_vae_file_is_one_line(case, model_with_vae, work, capsys):
    root, write, marker = model_with_vae
    message = write(case)
    before = tree_hash(work)
    for low_memory in ([], ["--low-memory"]):  # low memory reads the VAE for the decode: checked at load all the same
        code, err = run_cli(cmd_generate, ["--model", root, "--prompt", "a fox", "--width", "32", "--height", "32",
                                           "--steps", "1", "--dtype", "float32", "--out", "x.png", *low_memory], capsys)
        assert_one_line(code, err, "Wan2.2_VAE.pth", message)  # one line: no phase ran
    code, err = run_cli(cmd_convert, ["--model", root, "--out", "converted", "--dtype", "float32"], capsys)
    last = err.strip().splitlines()[-1]  # after convert.py's progress bar
    assert code == 2 and "Traceback" not in err and last.startswith("error:") and message in last, err
    assert tree_hash(work) == before and not marker.exists()


def test_lfs_pointer_safetensors(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n")
    with pytest.raises(WeightsError, match="Git LFS pointer"):
        checkpoints.check_safetensors(f)
    f.write_bytes((16).to_bytes(8, "little") + b'{"a": {"x": 1}} ')
    with pytest.raises(WeightsError, match="not a safetensors file"):  # a header without data_offsets
        checkpoints.check_safetensors(f)


# --------------------------------------------------------------------------------------------- lance-mlx-launch
def launch(*argv, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "lance_mlx.launch", *map(str, argv)], capture_output=True,
                          text=True, timeout=120, env=env, cwd=cwd)


def assert_launch_refused(r, *messages):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lance-mlx-launch: error: "), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    for m in messages:
        assert m in lines[0], r.stderr


HOSTFILES = {
    "empty list": ("[]", "lists no hosts"),
    "empty hosts": ('{"hosts": []}', "lists no hosts"),
    "not JSON": ("[{ssh: mac1}", "not valid JSON"),
    "a string": ('"mac1.local"', "holds str"),
    "no ssh name": ('[{"ips": ["10.0.0.1"]}]', 'no "ssh" name'),
    "ips not a list": ('[{"ssh": "127.0.0.1", "ips": "10.0.0.1"}]', '"ips"'),
    "ring without ips": ('[{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}, {"ssh": "127.0.0.1"}]', "ring backend"),
    "unknown backend": ('{"backend": "tcp", "hosts": [{"ssh": "127.0.0.1"}]}', "unknown backend 'tcp'"),
}


@pytest.mark.parametrize("case", list(HOSTFILES))
def test_launch_refuses_bad_host_files(case, tmp_path):
    text, message = HOSTFILES[case]
    (tmp_path / "hosts.json").write_text(text)
    marker = tmp_path / "ran"
    r = launch("--hostfile", tmp_path / "hosts.json", "--", sys.executable, "-c",
               f"open({str(marker)!r}, 'w')")
    assert_launch_refused(r, message)
    assert not marker.exists()


def test_launch_names_itself(tmp_path):
    r = launch("--hostfile", tmp_path / "missing.json", "--", "true")
    assert_launch_refused(r, "host file", "missing.json", "not found")
    r = launch("--hosts", "127.0.0.1")  # mlx.launch's own error: no script
    assert r.returncode == 2 and "lance-mlx-launch: error: No script is provided" in r.stderr, r.stderr
    assert "-c: error" not in r.stderr


def test_launch_reports_an_unreachable_host(tmp_path):
    """ssh's own reason, before anything is launched (ssh stands in for the network here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_ssh = bin_dir / "ssh"
    fake_ssh.write_text("#!/bin/sh\necho 'ssh: connect to host mac2.local port 22: Connection refused' >&2\n"
                        f"echo \"$@\" >> {tmp_path / 'ssh_calls'}\nexit 255\n")
    fake_ssh.chmod(0o755)
    (tmp_path / "hosts.json").write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]},
                                                     {"ssh": "mac2.local", "ips": ["10.0.0.2"]}]))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    r = launch("--hostfile", tmp_path / "hosts.json", "--", sys.executable, "-c", "print('ran')", env=env)
    assert_launch_refused(r, "cannot reach mac2.local over ssh", "Connection refused")
    calls = (tmp_path / "ssh_calls").read_text().split("\n")
    assert calls[0].split()[-2:] == ["mac2.local", "true"] and "BatchMode=yes" in calls[0]
    assert len([c for c in calls if c]) == 1  # only the probe: nothing was launched


def test_launch_names_the_host_of_a_dropped_ssh_rank(tmp_path):
    """A host that answers the probe but whose rank's ssh then fails (exit 255, silent under LogLevel=QUIET)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text('#!/bin/sh\nfor last; do :; done\n[ "$last" = "true" ] && exit 0\nexit 255\n')
    (bin_dir / "ssh").chmod(0o755)
    (tmp_path / "hosts.json").write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]},
                                                     {"ssh": "mac2.local", "ips": ["127.0.0.1"]}]))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    r = launch("--hostfile", tmp_path / "hosts.json", "--", sys.executable, "-c", "import time; time.sleep(2)",
               env=env)
    assert r.returncode == 255 and "rank 1 on mac2.local exited with code 255: the ssh connection" in r.stderr, \
        r.stderr


def test_launch_of_local_ranks_still_runs(tmp_path):
    (tmp_path / "hosts.json").write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}]))
    r = launch("--hostfile", tmp_path / "hosts.json", "--", sys.executable, "-c", "print('ran')")
    assert r.returncode == 0 and "ran" in r.stdout, r.stderr


def test_launch_errors_are_lance_errors(tmp_path):
    from lance_mlx.launch import LaunchError, read_hostfile

    (tmp_path / "hosts.json").write_text("[]")
    with pytest.raises(LaunchError, match="lists no hosts") as e:
        read_hostfile(tmp_path / "hosts.json")
    assert isinstance(e.value, LanceError) and e.value.exit_code == 2


@pytest.mark.parametrize("index", ["{not json", '{"weight_map": ["a"]}', "[]"])
def test_bad_shard_index_is_a_weights_error(index, tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(WeightsError, match="model.safetensors.index.json"):
        checkpoints.sharded_files(tmp_path)


@pytest.mark.parametrize("argv,message", [
    (["--model", "bad repo!/x y"], "OWNER/NAME"),
    (["--video-model", "https://huggingface.co/spaces/a/b"], "space, not a repo of weights"),
    (["--max-queue", "0"], "--max-queue must be at least 1"),
    (["--port", "70000"], "--port must be in [0, 65535]"),
])
def test_serve_refuses_bad_settings_with_exit_2(argv, message, work, capsys):
    from lance_mlx import cmd_serve

    code, err = run_cli(cmd_serve, argv, capsys)
    assert_one_line(code, err, message)
