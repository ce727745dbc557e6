"""`asyncckpt verify`, `inspect`, `diff`, `export` and `prune` on real checkpoints written by CheckpointManager."""

from __future__ import annotations

import io
import json
import re
import struct
import sys
from pathlib import Path

import pytest
import torch

from _cli import cli, remaining
from asyncckpt import CheckpointManager
from asyncckpt._progress import Progress, format_bytes, progress_bar
from asyncckpt.cli import tools
from asyncckpt.cli.commands import main
from asyncckpt.engine.reader import read_manifest, verify_checkpoint
from asyncckpt.errors import CheckpointError
from asyncckpt.format import step_dir_name

STEPS = [10, 20, 30, 40, 50]
LOSSES = {10: 0.5, 20: 0.1, 30: 0.9, 40: 0.3, 50: 0.7}


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))


def train_one(model, opt) -> None:
    model(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    opt.zero_grad()


@pytest.fixture
def run(tmp_path):
    """A root with a checkpoint per STEPS of a real model + AdamW; returns (root, model state dicts per step)."""
    root = tmp_path / "ckpts"
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    state = {"model": model, "optimizer": opt, "step": 0, "extra": {"name": "run-a", "empty": [], "dt": torch.bfloat16}}
    weights = {}
    with CheckpointManager(root, keep_last=None, workers=2) as mgr:
        for step in STEPS:
            train_one(model, opt)
            state["step"] = step
            mgr.save(step, state, metrics={"loss": LOSSES[step]}, metadata={"run": "a"}).wait()
            weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return root, weights


def ckpt(root: Path, step: int) -> Path:
    return root / step_dir_name(step)


# ----------------------------------------------------------------------------------------- inspect


def test_inspect_lists_every_leaf_with_dtype_shape_and_bytes(run, capsys):
    root, weights = run
    code, out, _ = cli(capsys, "inspect", ckpt(root, 20))
    assert code == 0
    assert "step        20" in out
    assert '"loss": 0.1' in out and '"run": "a"' in out
    for name, tensor in weights[20].items():
        expected = f"state['model'].state_dict()[{name!r}]: tensor float32 {tuple(tensor.shape)} {tensor.nbytes} bytes"
        assert expected in out
    assert "state['step']: 20" in out
    assert "state['extra']['name']: 'run-a'" in out
    assert "state['extra']['empty']: []" in out
    assert "state['extra']['dt']: dtype torch.bfloat16" in out
    assert "state['optimizer'].state_dict()['param_groups'][0]['lr']: 0.01" in out


def test_inspect_json_reads_only_the_manifest(run, capsys):
    root, weights = run
    path = ckpt(root, 30)
    for data in path.glob("data-*.bin"):
        data.unlink()  # no tensor bytes left: inspect must not need them
    code, out, _ = cli(capsys, "inspect", path, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["step"] == 30 and info["metrics"] == {"loss": 0.9} and info["metadata"] == {"run": "a"}
    assert info["raw_bytes"] > 0 and info["stored_bytes"] > 0 and info["ratio"] > 0
    rows = {row["path"]: row for row in info["leaves"]}
    w = rows["state['model'].state_dict()['0.weight']"]
    assert (w["kind"], w["dtype"], w["shape"], w["bytes"]) == ("tensor", "float32", [16, 8], 16 * 8 * 4)
    assert rows["state['step']"] == {"path": "state['step']", "kind": "value", "value": 30}
    model_rows = [p for p in rows if p.startswith("state['model']")]
    assert len(model_rows) == len(weights[30])


# -------------------------------------------------------------------------------------------- diff


def test_diff_of_a_checkpoint_with_itself_is_all_equal(run, capsys):
    root, _ = run
    code, out, _ = cli(capsys, "diff", ckpt(root, 10), ckpt(root, 10), "--json")
    assert code == 0
    result = json.loads(out)
    assert set(result["counts"]) == {"equal"}
    for row in result["leaves"]:
        if "max_abs_diff" in row:
            assert row["max_abs_diff"] == 0 and row["max_rel_diff"] == 0


def test_diff_reports_max_abs_and_rel_per_tensor(run, capsys):
    root, weights = run
    code, out, _ = cli(capsys, "diff", ckpt(root, 10), ckpt(root, 20), "--json", "--all")
    assert code == 1
    rows = {row["path"]: row for row in json.loads(out)["leaves"]}
    for name in weights[10]:
        a, b = weights[10][name].double(), weights[20][name].double()
        row = rows[f"state['model'].state_dict()[{name!r}]"]
        assert row["status"] == "different"
        assert row["max_abs_diff"] == pytest.approx(float((a - b).abs().max()), rel=1e-12)
        rel = ((a - b).abs() / torch.maximum(a.abs(), b.abs())).nan_to_num(0.0)
        assert row["max_rel_diff"] == pytest.approx(float(rel.max()), rel=1e-12)
    assert rows["state['step']"] == {"path": "state['step']", "status": "different", "a": 10, "b": 20}
    assert rows["state['extra']['name']"]["status"] == "equal"
    code, text, _ = cli(capsys, "diff", ckpt(root, 10), ckpt(root, 20))
    assert code == 1
    assert "different           state['step']  10 -> 20" in text
    assert "max_abs_diff=" in text and "max_rel_diff=" in text


def test_diff_reports_missing_extra_dtype_shape_and_integer_changes(tmp_path, capsys):
    a = {"x": torch.ones(4), "y": torch.ones(3), "ids": torch.arange(5), "mask": torch.ones(2, dtype=torch.bool)}
    b = {"x": torch.ones(4, dtype=torch.float16), "y": torch.ones(2, 3), "ids": torch.arange(5) + 1}
    a["only_a"] = 1
    b["only_b"] = torch.zeros(1)
    b["mask"] = torch.ones(2, dtype=torch.bool)
    for name, state in (("a", a), ("b", b)):
        with CheckpointManager(tmp_path / name) as mgr:
            mgr.save(1, state).wait()
    code, out, _ = cli(capsys, "diff", ckpt(tmp_path / "a", 1), ckpt(tmp_path / "b", 1), "--json", "--all")
    assert code == 1
    rows = {row["path"]: row for row in json.loads(out)["leaves"]}
    assert rows["state['x']"]["status"] == "dtype/shape changed"
    assert rows["state['x']"]["a"] == {"dtype": "float32", "shape": [4]}
    assert rows["state['x']"]["b"] == {"dtype": "float16", "shape": [4]}
    assert rows["state['y']"]["b"] == {"dtype": "float32", "shape": [2, 3]}
    assert rows["state['ids']"] == {"path": "state['ids']", "status": "different"}
    assert rows["state['mask']"] == {"path": "state['mask']", "status": "equal"}
    assert rows["state['only_a']"]["status"] == "missing"
    assert rows["state['only_b']"]["status"] == "extra"
    code, text, _ = cli(capsys, "diff", ckpt(tmp_path / "a", 1), ckpt(tmp_path / "b", 1))
    assert code == 1
    assert "state['only_a']  (only in A)" in text and "state['only_b']  (only in B)" in text
    assert "float32(4,) -> float16(4,)" in text


# ------------------------------------------------------------------------------------------ export

ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A minimal, independent safetensors reader: u64 header length, JSON header, raw bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8 : 8 + n].decode())
    data = raw[8 + n :]
    metadata = header.pop("__metadata__", {})
    out = {}
    end_max = 0
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        end_max = max(end_max, end)
        buf = torch.frombuffer(bytearray(data[start:end]), dtype=torch.uint8)
        out[name] = buf.view(ST_DTYPES[entry["dtype"]]).reshape(entry["shape"])
    assert end_max == len(data)  # the offsets cover the whole data section, nothing trailing
    return out, metadata


def assert_bit_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_export_safetensors_is_bit_exact_with_the_state_dict(run, tmp_path, capsys):
    root, weights = run
    out = tmp_path / "export" / "model.safetensors"
    out.parent.mkdir()
    code, text, _ = cli(capsys, "export", ckpt(root, 40), "-o", out)
    assert code == 0 and f"wrote {out}" in text
    tensors, metadata = read_safetensors(out)
    assert_bit_equal(tensors, weights[40])
    assert metadata["asyncckpt_step"] == "40" and metadata["format"] == "pt"
    assert [p.name for p in out.parent.iterdir()] == ["model.safetensors"]  # no temp file left behind


def test_export_bf16_equals_to_bfloat16(run, tmp_path, capsys):
    root, weights = run
    out = tmp_path / "bf16.safetensors"
    code, _, _ = cli(capsys, "export", ckpt(root, 40), "-o", out, "--dtype", "bf16")
    assert code == 0
    tensors, _ = read_safetensors(out)
    assert_bit_equal(tensors, {k: v.to(torch.bfloat16) for k, v in weights[40].items()})


def test_export_loads_with_the_safetensors_package(run, tmp_path, capsys):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    root, weights = run
    for dtype, cast in ((None, torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        out = tmp_path / f"{dtype}.safetensors"
        extra = ["--dtype", dtype] if dtype else []
        assert cli(capsys, "export", ckpt(root, 50), "-o", out, *extra)[0] == 0
        assert_bit_equal(safetensors_torch.load_file(str(out)), {k: v.to(cast) for k, v in weights[50].items()})


def test_export_mixed_dtypes_and_nested_keys(tmp_path, capsys):
    state = {
        "model": {
            "enc": {"w": torch.randn(3, 2), "ids": torch.arange(4)},
            "layers": [torch.ones(2, dtype=torch.float16)],
        },
        "scalar": torch.tensor(2.5),
    }
    with CheckpointManager(tmp_path / "r") as mgr:
        mgr.save(1, state).wait()
    out = tmp_path / "m.safetensors"
    assert cli(capsys, "export", ckpt(tmp_path / "r", 1), "-o", out, "--dtype", "fp32")[0] == 0
    tensors, _ = read_safetensors(out)
    want = {"enc.w": state["model"]["enc"]["w"], "enc.ids": state["model"]["enc"]["ids"], "layers.0": torch.ones(2)}
    assert_bit_equal(tensors, want)  # ints are never cast
    assert cli(capsys, "export", ckpt(tmp_path / "r", 1), "-o", out, "--key", "model.enc", "--force")[0] == 0
    assert_bit_equal(read_safetensors(out)[0], {"w": want["enc.w"], "ids": want["enc.ids"]})
    assert cli(capsys, "export", ckpt(tmp_path / "r", 1), "-o", out, "--key", "scalar", "--force")[0] == 0
    assert_bit_equal(read_safetensors(out)[0], {"scalar": state["scalar"]})


def test_export_of_a_dict_with_an_empty_key_keeps_every_tensor(tmp_path, capsys):
    """A key "" is a tensor's name like any other: the whole dict was replaced by that one tensor."""
    state = {"model": {"": torch.zeros(2), "w": torch.ones(3), "b": torch.arange(4.0)}}
    with CheckpointManager(tmp_path / "r") as mgr:
        mgr.save(1, state).wait()
    out = tmp_path / "m.pt"
    assert cli(capsys, "export", ckpt(tmp_path / "r", 1), "-o", out, "--format", "pt")[0] == 0
    assert_bit_equal(torch.load(out, weights_only=True), state["model"])


def test_export_to_safetensors_refuses_a_tensor_named_like_its_metadata_entry(tmp_path, capsys):
    """A tensor named ``__metadata__`` overwrote the header's metadata: the file did not load."""
    state = {"model": {"__metadata__": torch.ones(2), "w": torch.ones(3)}}
    with CheckpointManager(tmp_path / "r") as mgr:
        mgr.save(1, state).wait()
    out = tmp_path / "m.safetensors"
    code, _, err = cli(capsys, "export", ckpt(tmp_path / "r", 1), "-o", out)
    assert code == 2 and "'__metadata__'" in err and "--format pt" in err, err
    assert not out.exists()
    assert cli(capsys, "export", ckpt(tmp_path / "r", 1), "-o", tmp_path / "m.pt")[0] == 0


def test_export_pt_is_a_flat_dict(run, tmp_path, capsys):
    root, weights = run
    out = tmp_path / "model.pt"
    assert cli(capsys, "export", ckpt(root, 40), "-o", out, "--format", "pt")[0] == 0
    assert_bit_equal(torch.load(out, weights_only=True), weights[40])
    out = tmp_path / "opt.pt"
    code, _, err = cli(capsys, "export", ckpt(root, 40), "-o", out, "--format", "pt", "--key", "optimizer")
    assert code == 0 and "non-tensor leaves" in err
    flat = torch.load(out, weights_only=True)
    assert "state.0.weight.exp_avg" in flat and flat["state.0.weight.exp_avg"].shape == (16, 8)  # by name


def test_export_errors_leave_no_output(run, tmp_path, capsys):
    root, _ = run
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"keep me")
    code, _, err = cli(capsys, "export", ckpt(root, 40), "-o", out, "--key", "nope", "--force")
    assert code == 2 and "asyncckpt: error:" in err and "'nope'" in err and "'model'" in err
    code, _, err = cli(capsys, "export", ckpt(root, 40), "-o", out, "--key", "step", "--force")
    assert code == 2 and "holds no tensors" in err
    assert out.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "ckpts") == ["x.safetensors"]


# ------------------------------------------------------------------------------------------- prune


def test_prune_dry_run_deletes_nothing(run, capsys):
    root, _ = run
    code, out, _ = cli(capsys, "prune", root, "--keep-last", "2", "--dry-run")
    assert code == 0
    assert "would delete step 10" in out and "would delete step 20" in out and "would delete step 30" in out
    assert "would delete step 40" not in out
    assert remaining(root) == STEPS


def test_prune_keep_last_and_best(run, capsys):
    root, _ = run
    code, out, _ = cli(capsys, "prune", root, "--keep-last", "1", "--keep-best", "1", "--metric", "loss")
    assert code == 0 and "deleted 3, kept 2: [20, 50]" in out
    assert remaining(root) == [20, 50]
    assert ckpt(root, 20).joinpath("manifest.json").exists()


def test_prune_keep_best_max_and_keep_every(run, capsys):
    root, _ = run
    argv = ["prune", root, "--keep-last", "1", "--keep-best", "1", "--metric", "loss", "--mode", "max"]
    assert cli(capsys, *argv, "--keep-every", "20")[0] == 0
    assert remaining(root) == [20, 30, 40, 50]


def test_prune_refuses_a_root_with_a_live_writer(run, capsys):
    root, _ = run
    with CheckpointManager(root, keep_last=None):
        code, _, err = cli(capsys, "prune", root, "--keep-last", "1")
        assert code == 2 and "asyncckpt: error:" in err and "in use" in err
        assert remaining(root) == STEPS
        assert cli(capsys, "prune", root, "--keep-last", "1", "--dry-run")[0] == 0  # read-only: allowed
    assert cli(capsys, "prune", root, "--keep-last", "1")[0] == 0
    assert remaining(root) == [50]


def test_prune_bad_options(run, capsys):
    root, _ = run
    code, _, err = cli(capsys, "prune", root, "--keep-last", "1", "--keep-best", "1")
    assert code == 2 and "--metric" in err
    code, _, err = cli(capsys, "prune", root, "--keep-last", "0")
    assert code == 2 and "--keep-last" in err
    assert remaining(root) == STEPS


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("command", ["inspect", "diff", "export"])
def test_helpful_errors_for_wrong_paths(run, tmp_path, capsys, command):
    root, _ = run
    plain = tmp_path / "plain"
    plain.mkdir()
    extra = {"inspect": [], "diff": [ckpt(root, 10)], "export": ["-o", tmp_path / "o.safetensors"]}[command]
    cases = {
        tmp_path / "missing": "does not exist",
        plain: "is not a checkpoint",
        root: "is a checkpoint root, not a checkpoint",
    }
    for path, message in cases.items():
        code, out, err = cli(capsys, command, path, *extra)
        assert code == 2, (path, out)
        assert err.startswith("asyncckpt: error:") and message in err
        assert "Traceback" not in err
    assert not (tmp_path / "o.safetensors").exists()


def test_prune_errors_for_wrong_paths(run, tmp_path, capsys):
    root, _ = run
    code, _, err = cli(capsys, "prune", tmp_path / "missing", "--keep-last", "1")
    assert code == 2 and "does not exist" in err
    assert not (tmp_path / "missing").exists()  # not created by the failed prune
    code, _, err = cli(capsys, "prune", ckpt(root, 10), "--keep-last", "1")
    assert code == 2 and "not a checkpoint root" in err
    assert remaining(root) == STEPS


def test_diff_nan_and_inf_give_strict_json(tmp_path, capsys):
    nan, inf = float("nan"), float("inf")
    states = {"a": {"same": torch.tensor([nan, inf, 1.0]), "bad": torch.tensor([nan, 2.0])}}
    states["b"] = {"same": torch.tensor([nan, inf, 1.0]), "bad": torch.tensor([1.0, 2.0])}
    for name, state in states.items():
        with CheckpointManager(tmp_path / name) as mgr:
            mgr.save(1, state).wait()
    code, out, _ = cli(capsys, "diff", ckpt(tmp_path / "a", 1), ckpt(tmp_path / "b", 1), "--json", "--all")
    assert code == 1

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    rows = {row["path"]: row for row in json.loads(out, parse_constant=no_constants)["leaves"]}
    assert rows["state['same']"] == {
        "path": "state['same']",
        "status": "equal",
        "max_abs_diff": 0.0,
        "max_rel_diff": 0.0,
    }
    assert rows["state['bad']"]["status"] == "different"
    assert rows["state['bad']"]["max_abs_diff"] == "inf" and rows["state['bad']"]["max_rel_diff"] == "inf"


def test_diff_equal_is_bit_for_bit(tmp_path, capsys):
    """-0.0 against 0.0, and NaNs of other payloads, are equal in value only: a diff that said
    "equal" (exit 0) there would pass a resume that is not bit-exact."""
    other_nan = torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)
    states = {
        "a": {"zero": torch.tensor([0.0, 1.0]), "nan": torch.tensor([float("nan")]), "v": 0.0, "n": 1.5},
        "b": {"zero": torch.tensor([-0.0, 1.0]), "nan": other_nan, "v": -0.0, "n": 1.5},
    }
    for name, state in states.items():
        with CheckpointManager(tmp_path / name) as mgr:
            mgr.save(1, state).wait()
    code, out, _ = cli(capsys, "diff", ckpt(tmp_path / "a", 1), ckpt(tmp_path / "b", 1), "--json", "--all")
    assert code == 1
    rows = {row["path"]: row for row in json.loads(out)["leaves"]}
    for name in ("zero", "nan"):
        assert rows[f"state['{name}']"]["status"] == "different" and rows[f"state['{name}']"]["bits_only"] is True
    assert rows["state['v']"]["status"] == "different" and rows["state['n']"]["status"] == "equal"
    code, out, _ = cli(capsys, "diff", ckpt(tmp_path / "a", 1), ckpt(tmp_path / "b", 1))
    assert code == 1 and "state['zero']  equal in value, not in bits" in out and "3 different" in out, out


def test_diff_tells_a_tuple_a_list_and_a_dict_of_int_keys_apart(tmp_path, capsys):
    """Their items' paths are spelled alike (``[0]``), and load gives back what was saved."""
    states = {
        "a": {"x": (1, 2), "t": (torch.ones(2),), "k": {0: 5, 1: 6}, "same": [1]},
        "b": {"x": [1, 2], "t": [torch.ones(2)], "k": [5, 6], "same": [1]},
    }
    for name, state in states.items():
        with CheckpointManager(tmp_path / name) as mgr:
            mgr.save(1, state).wait()
    code, out, _ = cli(capsys, "diff", ckpt(tmp_path / "a", 1), ckpt(tmp_path / "b", 1), "--json")
    assert code == 1
    rows = json.loads(out)["leaves"]
    assert {row["path"] for row in rows if row.get("container")} == {"state['x']", "state['t']", "state['k']"}
    changed = {row["path"]: (row["a"], row["b"]) for row in rows}
    assert changed == {
        "state['x']": ({"kind": "tuple"}, {"kind": "list"}),
        "state['t']": ({"kind": "tuple"}, {"kind": "list"}),
        "state['k']": ({"kind": "dict"}, {"kind": "list"}),
    }
    code, out, _ = cli(capsys, "diff", ckpt(tmp_path / "a", 1), ckpt(tmp_path / "b", 1))
    assert code == 1 and "kind changed        state['k']  dict -> list" in out, out
    # the items are the leaves (x: 2, t: 1, k: 2, same: 1); the containers are counted apart
    assert "6 leaves and 3 containers: 6 equal, 3 kind changed; the checkpoints differ" in out, out


def test_inspect_marks_tied_tensors(tmp_path, capsys):
    shared = torch.randn(4)
    with CheckpointManager(tmp_path / "r") as mgr:
        mgr.save(1, {"a": shared, "b": shared}).wait()
    code, out, _ = cli(capsys, "inspect", ckpt(tmp_path / "r", 1))
    assert code == 0
    assert "state['a']: tensor float32 (4,) 16 bytes\n" in out
    assert "state['b']: tensor float32 (4,) 16 bytes (tied to state['a'])" in out


# ------------------------------------------------------------------------------- progress: verify


def stored_total(root: Path) -> int:
    return sum(read_manifest(ckpt(root, step)).stored_bytes for step in STEPS)


def final_bar(err: str) -> str:
    """The bar's last state: what follows the last carriage return, which close() ends with a newline."""
    assert err.endswith("\n"), repr(err)
    return err.rstrip("\n").rsplit("\r", 1)[-1]


def flip_a_byte(path: Path) -> None:
    data = path / "data-00000.bin"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x40
    data.write_bytes(bytes(raw))


def test_verify_progress_forced_shows_the_final_bar_on_stderr_only(run, capsys):
    root, _ = run
    total = format_bytes(stored_total(root))
    code, out, err = cli(capsys, "verify", root, "--progress")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == len(STEPS)
    for line, step in zip(lines, STEPS, strict=True):
        assert line.startswith(f"ok       {ckpt(root, step)} (") and re.search(r" \(\d+ chunks? verified\)$", line)
    last = final_bar(err)
    assert last.startswith("verify [####################] 100%")
    assert f"{total}/{total}" in last and "MB/s" in last
    assert "\r" not in out and "%" not in out


def test_verify_json_stays_valid_json_with_the_bar_forced(run, capsys):
    root, _ = run
    code, out, err = cli(capsys, "verify", root, "--json", "--progress")
    assert code == 0
    rows = json.loads(out)  # nothing of the bar on stdout
    assert [row["step"] for row in rows] == STEPS and {row["status"] for row in rows} == {"ok"}
    assert sum(row["stored_bytes"] for row in rows) == stored_total(root)
    assert "100%" in final_bar(err)


def test_verify_draws_no_bar_unless_stderr_is_a_terminal_or_forced(run, capsys, monkeypatch):
    root, _ = run
    assert cli(capsys, "verify", root)[2] == ""  # stderr captured by pytest: not a terminal
    code, out, err = cli(capsys, "verify", root, "--json", "--no-progress")
    assert code == 0 and err == "" and len(json.loads(out)) == len(STEPS)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for argv, shown in ((["verify", root], True), (["verify", root, "--no-progress"], False)):
        terminal = Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        assert main([str(a) for a in argv]) == 0
        assert ("100%" in terminal.getvalue()) is shown
    assert main(["verify", str(root), "--progress", "--no-progress"]) == 2


def test_verify_callback_gets_each_chunk_and_sums_to_the_stored_bytes(run):
    root, _ = run
    for workers in (1, 4):
        for step in STEPS:
            calls: list[int] = []
            manifest = verify_checkpoint(ckpt(root, step), calls.append, workers=workers)
            assert calls == [chunk.length for chunk in manifest.chunks]
            assert sum(calls) == manifest.stored_bytes == read_manifest(ckpt(root, step)).stored_bytes


def test_verify_damaged_checkpoint_exits_1_with_the_bar_forced(run, capsys):
    root, _ = run
    flip_a_byte(ckpt(root, 30))
    with pytest.raises(CheckpointError, match="checksum"):
        verify_checkpoint(ckpt(root, 30))
    code, out, err = cli(capsys, "verify", root, "--progress")
    assert code == 1
    assert f"DAMAGED  {ckpt(root, 30)}: " in out and "checksum" in out
    assert out.count("ok       ") == len(STEPS) - 1
    last = final_bar(err)
    assert last.startswith("verify [") and "100%" not in last  # the damaged chunk's bytes never count
    code, out, err = cli(capsys, "verify", root, "--json", "--progress")
    assert code == 1
    rows = {row["path"]: row for row in json.loads(out)}
    assert rows[str(ckpt(root, 30))]["status"] == "damaged" and "checksum" in rows[str(ckpt(root, 30))]["error"]
    assert cli(capsys, "verify", ckpt(root, 30), "--progress")[0] == 1  # one checkpoint, not a root


def test_verify_empty_root_exits_1(tmp_path, capsys):
    CheckpointManager(tmp_path).close()  # a root, but no checkpoint committed yet
    code, out, err = cli(capsys, "verify", tmp_path, "--json", "--progress")
    assert code == 1 and json.loads(out) == [] and "no checkpoints" in err


# ------------------------------------------------------------------------------- progress: export


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_export_callback_sums_to_the_exported_tensor_bytes(run, tmp_path, monkeypatch, fmt):
    root, weights = run
    tensor_bytes = sum(t.numel() * t.element_size() for t in weights[40].values())
    calls: list[int] = []
    out = tmp_path / f"m.{fmt}"
    done = tools.export_checkpoint(ckpt(root, 40), out, fmt=fmt, progress=calls.append)
    assert sum(calls) == done.bytes == tensor_bytes and all(n > 0 for n in calls)
    if fmt == "safetensors":
        assert calls == [weights[40][name].nbytes for name in sorted(weights[40])]  # one call per tensor
        monkeypatch.setattr(tools, "WRITE_SLICE", 64)  # a huge tensor is reported slice by slice
        calls.clear()
        tools.export_checkpoint(ckpt(root, 40), out, fmt=fmt, progress=calls.append, overwrite=True)
        assert sum(calls) == tensor_bytes and max(calls) == 64 and len(calls) > len(weights[40])
        assert_bit_equal(read_safetensors(out)[0], weights[40])
    else:
        assert_bit_equal(torch.load(out, weights_only=True), weights[40])


def test_export_progress_forced_and_by_default(run, tmp_path, capsys):
    root, weights = run
    total = format_bytes(sum(t.nbytes for t in weights[40].values()))
    out = tmp_path / "model.safetensors"
    code, text, err = cli(capsys, "export", ckpt(root, 40), "-o", out, "--progress")
    assert code == 0 and text.startswith(f"wrote {out}: {len(weights[40])} tensors")
    last = final_bar(err)
    assert last.startswith("export [####################] 100%") and f"{total}/{total}" in last
    assert_bit_equal(read_safetensors(out)[0], weights[40])
    for extra in ([], ["--no-progress"]):
        code, text, err = cli(capsys, "export", ckpt(root, 40), "-o", out, "--force", *extra)
        assert code == 0 and err == "" and text.startswith(f"replaced {out}")
    code, _, err = cli(capsys, "export", ckpt(root, 40), "-o", tmp_path / "o.pt", "--format", "pt", "--progress")
    assert code == 0 and "100%" in final_bar(err)


# ---------------------------------------------------------------------------------- progress: bar


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_bar_redraws_at_most_every_interval_and_ends_its_line():
    clock, stream = FakeClock(), io.StringIO()
    bar = Progress(4_000_000, "verify", stream, min_interval=0.1, clock=clock)
    bar.advance(1_000_000)  # at t=0: too soon to draw
    assert stream.getvalue() == ""
    clock.now = 0.5
    bar.advance(1_000_000)
    assert stream.getvalue() == "\rverify [##########----------]  50%  2.0 MB/4.0 MB  4.0 MB/s  ETA 0:01"
    clock.now = 0.55
    bar.advance(1_000_000)  # within 0.1 s of the last draw: not redrawn
    assert stream.getvalue().count("\r") == 1
    bar.clear()  # other output goes above the bar; the next advance redraws at once
    drawn = len("verify [##########----------]  50%  2.0 MB/4.0 MB  4.0 MB/s  ETA 0:01")
    assert stream.getvalue().endswith("\r" + " " * drawn + "\r")
    clock.now = 0.56
    bar.advance(500_000)
    assert stream.getvalue().endswith("\rverify [#################---]  87%  3.5 MB/4.0 MB  6.2 MB/s  ETA 0:00")
    clock.now = 1.0
    bar.advance(500_000)
    bar.close()
    bar.close()  # idempotent
    assert final_bar(stream.getvalue()) == "verify [####################] 100%  4.0 MB/4.0 MB  4.0 MB/s  in 0:01"
    assert stream.getvalue().count("\n") == 1


def test_progress_bar_is_a_null_object_when_disabled():
    stream = io.StringIO()
    bar = progress_bar(10, "x", enabled=False, stream=stream)
    bar.advance(10)
    bar.clear()
    bar.close()
    assert stream.getvalue() == ""
    assert isinstance(progress_bar(10, "x", stream=stream), type(bar))  # a StringIO is no terminal
    assert isinstance(progress_bar(10, "x", enabled=True, stream=stream), Progress)
    assert [format_bytes(n) for n in (999, 1000, 21_126, 40_240_000, 3e9)] == [
        "999 B",
        "1.0 kB",
        "21.1 kB",
        "40.2 MB",
        "3.0 GB",
    ]
