"""Every ``asyncckpt`` command on a checkpoint saved by 2 spawned gloo ranks (DDP + per-rank state)."""

from __future__ import annotations

import json

import pytest
import torch

from _cli import cli, remaining, strict_json
from _dist import run_ranks
from asyncckpt import load
from asyncckpt.cli import tools
from asyncckpt.format import step_dir_name

STEPS = [1, 2, 3]


def _save_steps(rank: int, world_size: int, root: str) -> None:
    from _dist_models import make_ddp, train_steps
    from asyncckpt import CheckpointManager

    model, optim = make_ddp(seed=0)
    mgr = CheckpointManager(root, keep_last=None, rank_timeout=60.0)
    for step in STEPS:
        train_steps(model, optim, step, 1, rank)
        # "rank_id" differs per rank: per-rank state the consolidated view cannot pick by itself
        mgr.save(
            step, {"model": model, "optim": optim, "rank_id": torch.tensor([rank, step])}, metrics={"loss": step / 10}
        )
    mgr.wait()
    mgr.close()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("mr-cli") / "ckpt"
    run_ranks(_save_steps, 2, str(path), timeout=180)
    assert remaining(path) == STEPS
    return path


def test_ls_lists_multirank_steps(root, capsys):
    code, out, _ = cli(capsys, "ls", root, "--json")
    assert code == 0, out
    rows = strict_json(out)
    assert [r["step"] for r in rows] == STEPS
    code, out, _ = cli(capsys, "ls", root)
    assert code == 0 and "step-0000000003" in out or "3" in out


def test_verify_checks_every_rank(root, capsys):
    code, out, err = cli(capsys, "verify", root)
    assert code == 0, out + err
    code, out, err = cli(capsys, "verify", root / step_dir_name(2))
    assert code == 0, out + err


def test_inspect_shows_world_size_and_per_rank_state(root, capsys):
    code, out, err = cli(capsys, "inspect", root / step_dir_name(3))
    assert code == 0, out + err
    assert "world size" in out.lower() and "2" in out
    assert "rank_id" in out  # per rank
    assert "layers.0.weight" in out  # consolidated tensors
    code, out, err = cli(capsys, "inspect", root / step_dir_name(3), "--json")
    assert code == 0, out + err
    info = strict_json(out)
    assert info["world_size"] == 2
    assert info["per_rank"] == ["state['rank_id']"]
    weight = next(leaf for leaf in info["leaves"] if leaf["path"] == "state['model'].state_dict()['layers.0.weight']")
    full = load(root, step=3, per_rank="rank0")["model"]["layers.0.weight"]
    assert weight["shape"] == list(full.shape)


def test_diff_between_multirank_steps(root, capsys):
    code, out, err = cli(capsys, "diff", root / step_dir_name(1), root / step_dir_name(2), "--json")
    assert code in (0, 1), out + err
    result = strict_json(out)
    text = json.dumps(result)
    assert "layers.0.weight" in text and "rank_id" in text
    code, out, err = cli(capsys, "diff", root / step_dir_name(2), root / step_dir_name(2))
    assert code == 0, out + err


def test_diff_compares_each_ranks_own_state_rank_by_rank(root, capsys):
    """The consolidated view holds rank 0's own state alone: a change on another rank passed as equal."""
    code, out, err = cli(capsys, "diff", root / step_dir_name(1), root / step_dir_name(2), "--json", "--all")
    assert code == 1, out + err
    rows = {row["path"]: row for row in strict_json(out)["leaves"]}
    assert "state['rank_id']" not in rows
    for rank in (0, 1):
        row = rows[f"state['rank_id'] (rank {rank})"]
        assert row["status"] == "different", row  # [rank, 1] -> [rank, 2]
    code, out, _ = cli(capsys, "diff", root / step_dir_name(2), root / step_dir_name(2), "--all")
    assert code == 0 and "state['rank_id'] (rank 1)" in out
    calls: list[int] = []
    a, b = root / step_dir_name(1), root / step_dir_name(2)
    tools.diff_checkpoints(a, b, progress=calls.append)
    assert sum(calls) == tools.diff_total_bytes(a, b) > 0


def test_export_of_tensors_each_rank_kept_needs_a_choice(root, tmp_path, capsys):
    out_file = tmp_path / "ids.pt"
    code, _, err = cli(capsys, "export", root / step_dir_name(3), "-o", out_file, "--key", "rank_id")
    assert code == 2 and "saved by 2 ranks, and each kept its own rank_id" in err and "--per-rank rank0" in err, err
    assert not out_file.exists()
    args = ("--key", "rank_id", "--per-rank", "rank0")
    code, out, err = cli(capsys, "export", root / step_dir_name(3), "-o", out_file, *args)
    assert code == 0, out + err
    assert torch.equal(torch.load(out_file, weights_only=True)["rank_id"], torch.tensor([0, 3]))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_export_consolidated(root, tmp_path, capsys, suffix):
    out_file = tmp_path / f"model{suffix}"
    code, out, err = cli(capsys, "export", root / step_dir_name(3), "-o", out_file, "--key", "model")
    assert code == 0, out + err
    if suffix == ".pt":
        got = torch.load(out_file, weights_only=True)
    else:
        from safetensors.torch import load_file

        got = load_file(str(out_file))
    want = load(root, step=3, per_rank="rank0")["model"]
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_stats_reads_rank0_metrics_log(root, capsys):
    code, out, err = cli(capsys, "stats", root, "--json")
    assert code == 0, out + err
    assert out.strip()


def test_prune_multirank(root, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    code, out, err = cli(capsys, "prune", copy, "--keep-last", "1")
    assert code == 0, out + err
    assert remaining(copy) == [3]
    assert not any(p.name.startswith("step-0000000001") for p in copy.iterdir())
    state = load(copy, per_rank="rank0")
    assert torch.equal(state["rank_id"], torch.tensor([0, 3]))
    code, out, err = cli(capsys, "verify", copy)
    assert code == 0, out + err


def test_a_metrics_log_line_of_a_multirank_save_is_read():
    """A multi-rank save logs ``max_rank_stall_s`` (None elsewhere): ``stats`` skipped every such
    line as "bad value" and found no records."""
    from asyncckpt.metrics import record_from_json

    assert record_from_json({"step": 1, "max_rank_stall_s": 0.25}).max_rank_stall_s == 0.25
    assert record_from_json({"step": 1, "max_rank_stall_s": None}).max_rank_stall_s is None
    with pytest.raises(ValueError, match="max_rank_stall_s"):
        record_from_json({"step": 1, "max_rank_stall_s": "slow"})


def test_load_weights_reads_the_model_of_a_multirank_checkpoint_whole(root):
    from _dist_models import DIMS, Net
    from asyncckpt import load_weights

    model = Net(DIMS)
    assert load_weights(root, model) == 3  # no per-rank state under "model": no choice needed
    full = load(root, step=3, per_rank="rank0")["model"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, full[name]), name


def _save_plain_per_rank(rank: int, world_size: int, root: str) -> None:
    from _dist_models import DIMS, Net
    from asyncckpt import CheckpointManager

    torch.manual_seed(rank)  # an unwrapped model: each rank's own weights
    with CheckpointManager(root, rank_timeout=60.0) as mgr:
        mgr.save(1, {"model": Net(DIMS)}).wait()


def test_load_weights_of_a_model_saved_per_rank_needs_a_choice(tmp_path):
    from _dist_models import DIMS, Net
    from asyncckpt import CheckpointError, load_weights

    run_ranks(_save_plain_per_rank, 2, str(tmp_path), timeout=180)
    model = Net(DIMS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="saved by each of its 2 ranks on its own.*per_rank='rank0'"):
        load_weights(tmp_path, model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert load_weights(tmp_path, model, per_rank="rank0") == 1
    torch.manual_seed(0)
    expected = Net(DIMS).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_inspect_says_where_each_tensor_is_stored(root, capsys):
    code, out, err = cli(capsys, "inspect", root / step_dir_name(3), "--json")
    assert code == 0, out + err
    rows = {row["path"]: row for row in strict_json(out)["leaves"]}
    # a DDP model and its optimizer are replicated: each tensor stored once, spread over both ranks
    replicated = [row for row in rows.values() if "pieces" in row]
    assert replicated and {rank for row in replicated for rank in row["ranks"]} == {0, 1}
    assert all(row["stored"].startswith(("1 piece on rank ", "2 pieces on ranks 0, 1")) for row in replicated)
    assert rows["state['rank_id']"]["stored"] == "per rank (rank 0's shown)"
    code, out, err = cli(capsys, "inspect", root / step_dir_name(3))
    assert "per rank (rank 0's shown)" in out and " piece" in out


def test_retention_reads_every_rank_table_and_the_other_ranks_none(root, tmp_path, capsys):
    """Where retention runs, a checkpoint one of whose rank tables cannot be read (missing, or not
    a table this version reads) is unreadable: kept, and never costs an older one that loads. A
    rank that applies no retention lists the root from the manifests alone."""
    import shutil

    from _sealing import seal, unseal
    from asyncckpt.engine.reader import read_manifest
    from asyncckpt.errors import CheckpointDamagedError
    from asyncckpt.format import seal_of
    from asyncckpt.storage.catalog import Catalog

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (copy / step_dir_name(3) / "rank-00001.json").unlink()
    # step 2: rank 1's table committed (its seal in the manifest) but not one this version reads
    step2 = copy / step_dir_name(2)
    table = seal({**unseal((step2 / "rank-00001.json").read_bytes()), "tensors": 7})
    (step2 / "rank-00001.json").write_bytes(table)
    manifest = unseal((step2 / "manifest.json").read_bytes())
    manifest["ranks"][1]["crc32"] = seal_of(table)
    (step2 / "manifest.json").write_bytes(seal(manifest))
    with pytest.raises(CheckpointDamagedError, match="rank-00001.json"):  # names the table
        read_manifest(step2)

    infos = Catalog.of_reader(copy).infos()
    assert [(i.step, i.metrics) for i in infos] == [(1, {"loss": 0.1}), (2, {}), (3, {})]
    assert [i.unreadable is None for i in infos] == [True, False, False]
    assert "rank-00001.json" in infos[1].unreadable and "rank-00001.json" in infos[2].unreadable
    listing = Catalog.of_reader(copy).checkpoints
    assert [(i.step, i.metrics, i.unreadable) for i in Catalog(listing, check_tables=False).infos()] == [
        (step, {"loss": step / 10}, None) for step in STEPS
    ]
    code, out, err = cli(capsys, "prune", copy, "--keep-last", "1")
    assert code == 0, out + err
    assert remaining(copy) == [1, 2, 3]  # the newest that loads, and the two that do not
