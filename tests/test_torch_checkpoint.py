"""Safe `.pth` reader: tensors round-trip, anything else in the pickle is refused before it runs."""

import collections
import io
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from lance_mlx.torch_checkpoint import CheckpointError, UnsafeCheckpointError, load_torch_checkpoint


def _write_archive(path, pickled: bytes, records=None):
    """A zip laid out like torch.save's: <name>/data.pkl plus raw storages under <name>/data/."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pickled)
        zf.writestr("archive/byteorder", "little")
        for key, data in (records or {}).items():
            zf.writestr(f"archive/data/{key}", data)
    return path


def test_round_trip_dtypes_and_views(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = collections.OrderedDict(
        f32=torch.randn(3, 4),
        f16=torch.randn(5).half(),
        bf16=torch.randn(2, 3).bfloat16(),
        i64=torch.arange(7),
        i32=torch.arange(3, dtype=torch.int32),
        u8=torch.arange(4, dtype=torch.uint8),
        boolean=torch.tensor([True, False, True]),
        transposed=base.t(),  # non-contiguous view
        offset_view=base[1:, 2:],  # shares base's storage with an offset
        base=base,
        conv=torch.randn(4, 2, 3, 3, 3),
        scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 3),
    )
    path = tmp_path / "state.pth"
    torch.save(state, path)
    loaded = load_torch_checkpoint(path)
    assert list(loaded) == list(state)
    for name, t in state.items():
        want = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        assert loaded[name].dtype == want.dtype, name  # bfloat16 comes back as float32
        np.testing.assert_array_equal(loaded[name], want, err_msg=name)


def test_parameters_and_wrapped_state_dict(tmp_path):
    layer = torch.nn.Linear(3, 2)
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": layer.state_dict(keep_vars=True), "epoch": 3}, path)  # nn.Parameter values
    loaded = load_torch_checkpoint(path)
    assert set(loaded) == {"weight", "bias"}
    np.testing.assert_array_equal(loaded["weight"], layer.weight.detach().numpy())


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "x": _RunsShell(marker)}, path)
    # The control: torch's full unpickler would run the payload.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UnsafeCheckpointError) as err:
        load_torch_checkpoint(path)
    msg = str(err.value)
    assert f"{os.name}.system" in msg or "os.system" in msg
    assert "evil.pth" in msg and "not a plain PyTorch state dict" in msg and "Fix:" in msg
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("subprocess", "Popen"), ("torch", "load"),
                                         ("numpy", "frombuffer")])
def test_any_other_global_is_refused(tmp_path, module, name):
    pickled = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x01\x00\x00\x001\x85R."
    path = _write_archive(tmp_path / "g.pth", pickled)
    with pytest.raises(UnsafeCheckpointError, match=rf"refusing to load global '{module}\.{name}'"):
        load_torch_checkpoint(path)


class _FakeStorage:
    pass


def _crafted_tensor_pickle(storage_key, numel, size, stride, offset=0):
    """Pickle of {"w": _rebuild_tensor_v2(<storage>, offset, size, stride, ...)} as torch.save writes it."""
    storage = _FakeStorage()

    class Tensor:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (storage, offset, size, stride, False, collections.OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, storage_key, "cpu", numel) if obj is storage else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"w": Tensor()})
    return buf.getvalue()


def test_view_past_storage_is_refused(tmp_path):
    path = _write_archive(tmp_path / "oob.pth", _crafted_tensor_pickle("0", 4, (100,), (1,)),
                          {"0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(CheckpointError, match=r"oob\.pth.*reaches past its storage of 4 elements"):
        load_torch_checkpoint(path)


def test_storage_key_must_be_a_record_name(tmp_path):
    path = _write_archive(tmp_path / "key.pth", _crafted_tensor_pickle("../../etc/passwd", 4, (4,), (1,)))
    with pytest.raises(UnsafeCheckpointError, match="not a plain record name"):
        load_torch_checkpoint(path)


def test_crafted_tensor_reads_correctly(tmp_path):
    data = np.arange(12, dtype=np.float32)
    path = _write_archive(tmp_path / "ok.pth", _crafted_tensor_pickle("0", 12, (3, 2), (1, 3), offset=2),
                          {"0": data.tobytes()})
    w = load_torch_checkpoint(path)["w"]
    np.testing.assert_array_equal(w, np.lib.stride_tricks.as_strided(data[2:], (3, 2), (4, 12)))


def test_missing_record(tmp_path):
    path = _write_archive(tmp_path / "norecord.pth", _crafted_tensor_pickle("0", 4, (4,), (1,)))
    with pytest.raises(CheckpointError, match=r"norecord\.pth.*'archive/data/0' is missing.*Fix"):
        load_torch_checkpoint(path)


def test_record_size_mismatch(tmp_path):
    path = _write_archive(tmp_path / "short.pth", _crafted_tensor_pickle("0", 4, (4,), (1,)), {"0": b"\0" * 8})
    with pytest.raises(CheckpointError, match=r"short\.pth.*holds 8 bytes, expected 4 x 4"):
        load_torch_checkpoint(path)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match=r"list\.pth.*does not hold a state dict"):
        load_torch_checkpoint(path)


def test_legacy_format(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy.*not supported.*Fix|legacy \(pre-zip\)"):
        load_torch_checkpoint(path)


def test_garbage_and_missing_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=r"junk\.pth.*truncated or corrupt"):
        load_torch_checkpoint(junk)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_torch_checkpoint(tmp_path / "missing.pth")


def test_check_reads_no_tensors_and_refuses_what_load_refuses(tmp_path):
    """check_torch_checkpoint: the archive, pickle and record sizes, without reading the records."""
    from lance_mlx.torch_checkpoint import check_torch_checkpoint

    good = tmp_path / "good.pth"
    torch.save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(2, dtype=torch.bfloat16)},
               good)
    assert check_torch_checkpoint(good) is None
    marker = tmp_path / "payload_ran"
    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(2), "x": _RunsShell(marker)}, bad)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load global"):
        check_torch_checkpoint(bad)
    assert not marker.exists()
    short = tmp_path / "short.pth"
    _write_archive(short, _crafted_tensor_pickle("0", 4, (4,), (1,)), {"0": b"\0" * 8})
    with pytest.raises(CheckpointError, match="holds 8 bytes"):
        check_torch_checkpoint(short)
    past = tmp_path / "past.pth"
    _write_archive(past, _crafted_tensor_pickle("0", 4, (3,), (2,)), {"0": b"\0" * 16})
    with pytest.raises(CheckpointError, match="reaches past its storage"):
        check_torch_checkpoint(past)
