"""restore and load_weights tell the truth: everything fits and is restored, or nothing is touched.

Every case uses real modules and optimizers and compares the whole live state with a deep copy
taken before the call, bit for bit, whenever an error is raised; ``strict=False`` must restore
exactly the matching part and return the exact lists.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from torch import nn

import asyncckpt
from _trees import assert_same_tree
from asyncckpt import CheckpointManager, RestoreResult, StateMismatchError
from asyncckpt.cli.commands import main as cli_main
from asyncckpt.format import MANIFEST_NAME, seal_manifest, step_dir_name
from asyncckpt.state.tree import flatten

# ---- helpers ------------------------------------------------------------------------------------


def snapshot(obj):
    """A deep, detached copy of everything observable in a live state (objects by their state)."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "meta":
            return ("meta", tuple(obj.shape), obj.dtype)
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    if callable(getattr(obj, "state_dict", None)):
        return ("object", type(obj).__name__, snapshot(obj.state_dict()))
    return copy.deepcopy(obj)


def unchanged(live, before):
    assert_same_tree(before, snapshot(live))


def trained(seed: int = 0, bias: bool = True):
    """A model with BatchNorm buffers and an AdamW that has stepped (so it has state)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8, bias=bias), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(16, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.fixture
def root(tmp_path):
    return tmp_path / "ckpts"


def save(root, step, state):
    with CheckpointManager(root, keep_last=None) as mgr:
        mgr.save(step, state).wait()


def restore(root, state, **kwargs):
    with CheckpointManager(root, keep_last=None) as mgr:
        return mgr.restore(state, **kwargs)


def saved_state():
    model, opt = trained(0)
    first = nn.Linear(3, 3)
    return {"first": first, "model": model, "opt": opt, "step": 5, "extra": {"epoch": 3, "added": [1]}}


def live_state(seed: int = 1, bias: bool = True):
    torch.manual_seed(seed + 100)
    model, opt = trained(seed, bias=bias)
    return {"first": nn.Linear(3, 3), "model": model, "opt": opt, "step": 0, "extra": {"epoch": 0, "only_live": "x"}}


# ---- strict (the default): a mismatch raises and nothing changes ---------------------------------


def test_missing_and_unexpected_keys_raise_listing_paths_and_change_nothing(root):
    save(root, 5, saved_state())
    live = live_state(bias=False)  # the live model has no '0.bias'; its AdamW then has one param fewer
    live["opt"] = torch.optim.AdamW(live["model"].parameters(), lr=1e-2)  # same param count as the model
    before = snapshot(live)
    with pytest.raises(StateMismatchError) as excinfo:
        restore(root, live)
    message = str(excinfo.value)
    assert "nothing was changed" in message
    assert "state['model'].state_dict()['0.bias']" in message  # unexpected: only in the checkpoint
    assert "state['extra']['only_live']" in message and "state['extra']['added']" in message
    assert excinfo.value.missing_keys == ("state['extra']['only_live']",)
    assert excinfo.value.unexpected_keys == (
        "state['model'].state_dict()['0.bias']",
        "state['opt'].state_dict()['state']['0.bias']",  # the optimizer's state of that parameter
        "state['extra']['added']",
    )
    unchanged(live, before)  # 'first', restored before the model in the old code, is untouched too


def test_an_optimizer_with_other_param_groups_is_refused_before_anything_changes(root):
    save(root, 5, saved_state())
    live = live_state()
    model = live["model"]
    live["opt"] = torch.optim.AdamW(
        [{"params": list(model[0].parameters())}, {"params": list(model[1].parameters()) + list(model[3].parameters())}]
    )
    before = snapshot(live)
    for strict in (True, False):
        with pytest.raises(StateMismatchError, match=re.escape("state['opt']") + ".*param group"):
            restore(root, live, strict=strict)
        unchanged(live, before)

    # one parameter fewer: the checkpoint's state of it is unexpected, by name
    live["opt"] = torch.optim.AdamW(list(model.parameters())[:-1])
    before = snapshot(live)
    with pytest.raises(StateMismatchError) as excinfo:
        restore(root, live)
    assert "state['opt'].state_dict()['state']['3.bias']" in excinfo.value.unexpected_keys
    unchanged(live, before)


def test_shape_mismatch_is_an_error_in_both_modes(root):
    save(root, 5, saved_state())
    live = live_state()
    live["first"] = nn.Linear(3, 4)
    before = snapshot(live)
    for strict in (True, False):
        with pytest.raises(StateMismatchError, match=re.escape("state['first'].state_dict()['weight']") + ".*shape"):
            restore(root, live, strict=strict)
        unchanged(live, before)


def test_a_live_module_where_the_checkpoint_holds_a_plain_dict_is_refused(root):
    model, _ = trained(0)
    save(root, 1, {"model": model.state_dict(), "w": torch.ones(2)})
    live = {"model": trained(1)[0], "w": torch.zeros(2)}
    before = snapshot(live)
    with pytest.raises(StateMismatchError, match=re.escape("state['model']") + ".*Sequential.*a dict"):
        restore(root, live, strict=False)
    unchanged(live, before)
    assert isinstance(live["model"], nn.Sequential)  # the old code replaced the model by a dict

    # the other way round a live state dict takes the checkpoint's tensors in place, as before
    live = {"model": trained(1)[0].state_dict(), "w": torch.zeros(2)}
    weight = live["model"]["0.weight"]
    assert restore(root, live) == 1
    assert live["model"]["0.weight"] is weight and torch.equal(weight, model[0].weight)


def test_meta_tensors_are_named_and_nothing_changes(root):
    save(root, 5, saved_state())
    live = live_state()
    with torch.device("meta"):
        live["model"] = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    live["opt"] = torch.optim.AdamW(live["model"].parameters(), lr=1e-2)
    before = snapshot(live)
    with pytest.raises(StateMismatchError) as excinfo:
        restore(root, live)
    message = str(excinfo.value)
    assert "state['model'].state_dict()['0.weight']: a meta tensor" in message
    assert "state['model'].state_dict()['1.running_mean']" in message
    assert "state['opt'].state_dict()['state']['0.weight']: its parameter is a meta tensor" in message
    unchanged(live, before)


def test_an_expanded_view_is_refused_before_anything_changes(root):
    save(root, 1, {"a": torch.ones(5), "e": torch.ones(3, 4), "model": nn.Linear(2, 2)})
    base = torch.zeros(4)
    live = {"a": torch.zeros(5), "e": base.expand(3, 4), "model": nn.Linear(2, 2)}
    before = snapshot(live)
    with pytest.raises(StateMismatchError, match=re.escape("state['e']") + ": .*overlap"):
        restore(root, live)
    unchanged(live, before)

    # a module buffer that is an expanded view: torch's load_state_dict copied the others first
    class Expanded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("table", torch.zeros(4).expand(3, 4))

    saved = Expanded()
    saved.table = torch.ones(3, 4)
    save(root, 2, {"model": saved})
    live = {"model": Expanded()}
    before = snapshot(live)
    with pytest.raises(StateMismatchError, match=re.escape("state['model'].state_dict()['table']") + ": .*overlap"):
        restore(root, live, step=2)
    unchanged(live, before)


def test_unwritable_leaves_are_listed_with_their_reasons_one_from_the_next(root):
    save(root, 1, {"e": torch.ones(3, 4), "m": torch.ones(2)})
    with torch.device("meta"):
        meta = torch.empty(2)
    with pytest.raises(StateMismatchError) as excinfo:
        restore(root, {"e": torch.zeros(4).expand(3, 4), "m": meta})
    assert (
        "cannot be restored in place (2): state['e']: its elements overlap in memory (an expand() view?), "
        "so it cannot be written in place; state['m']: a meta tensor has no data to restore into\n"
    ) in str(excinfo.value)
    assert excinfo.value.skipped == ("state['e']", "state['m']")


def test_an_inference_tensor_is_refused_before_anything_changes(root):
    save(root, 1, {"a": torch.ones(2), "b": torch.ones(2)})
    with torch.inference_mode():
        frozen = torch.zeros(2)
    live = {"a": torch.zeros(2), "b": frozen}
    before = snapshot(live)
    with pytest.raises(StateMismatchError, match=re.escape("state['b']") + ": .*inference"):
        restore(root, live)
    unchanged(live, before)


def test_a_failing_object_rolls_back_the_objects_restored_before_it(root):
    model, opt = trained(0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    for _ in range(3):
        opt.step()
        sched.step()
    sampler = asyncckpt.ResumableSampler(10, seed=1)
    save(root, 3, {"model": model, "opt": opt, "sched": sched, "sampler": sampler})

    live_model, live_opt = trained(1)
    live_sched = torch.optim.lr_scheduler.StepLR(live_opt, step_size=1)
    live = {"model": live_model, "opt": live_opt, "sched": live_sched, "sampler": asyncckpt.ResumableSampler(11)}
    before = snapshot(live)
    with pytest.raises(asyncckpt.CheckpointError, match=re.escape("state['sampler']") + ".*length mismatch"):
        restore(root, live)
    unchanged(live, before)  # the scheduler loaded before the sampler was put back; the model was not touched


def test_the_message_is_capped_but_the_lists_are_whole(root):
    save(root, 1, {"model": nn.Sequential(*[nn.Linear(1, 1) for _ in range(60)])})
    live = {"model": nn.Sequential(*[nn.Linear(1, 1, bias=False) for _ in range(60)])}
    with pytest.raises(StateMismatchError) as excinfo:
        restore(root, live)
    assert len(excinfo.value.unexpected_keys) == 60
    message = str(excinfo.value)
    assert "and 50 more" in message and len(message) < 3000


# ---- strict=False: restore exactly the matching part, return the exact lists ---------------------


def test_strict_false_restores_exactly_the_matching_part_and_returns_the_lists(root):
    state = saved_state()
    save(root, 5, state)
    live = live_state(bias=False)
    del live["opt"]  # an optimizer over other parameters could not take even part of the checkpoint
    with torch.device("meta"):
        live["lazy"] = torch.empty(3)
    live["expanded"] = torch.zeros(2).expand(2, 2)
    expanded = snapshot(live["expanded"])

    result = restore(root, live, strict=False)

    assert isinstance(result, RestoreResult)
    assert result == RestoreResult(
        step=5,
        missing_keys=("state['extra']['only_live']", "state['lazy']", "state['expanded']"),
        unexpected_keys=("state['model'].state_dict()['0.bias']", "state['opt']", "state['extra']['added']"),
        skipped=(),
    )
    model = live["model"]
    saved_model = state["model"]
    for name in ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(model.state_dict()[name], saved_model.state_dict()[name]), name
    assert torch.equal(model[3].weight, saved_model[3].weight)
    assert live["step"] == 5 and live["extra"] == {"epoch": 3, "only_live": "x", "added": [1]}  # inserted
    assert list(live["opt"]["state"]) == [n for n, _ in state["model"].named_parameters()]  # its state dict, by name
    assert torch.equal(live["first"].weight, state["first"].weight)
    assert live["lazy"].device.type == "meta"
    assert_same_tree(expanded, live["expanded"])


def test_strict_false_skips_meta_and_unwritable_leaves_and_reports_them(root):
    saved = {"a": torch.ones(3), "m": torch.ones(2), "e": torch.ones(3, 4), "model": nn.Linear(2, 2)}
    save(root, 1, saved)
    with torch.device("meta"):
        meta_model = nn.Linear(2, 2)
        meta = torch.empty(2)
    live = {"a": torch.zeros(3), "m": meta, "e": torch.zeros(4).expand(3, 4), "model": meta_model}
    result = restore(root, live, strict=False)
    assert result == RestoreResult(
        1,
        missing_keys=(),
        unexpected_keys=(),
        skipped=(
            "state['m']",
            "state['e']",
            "state['model'].state_dict()['weight']",
            "state['model'].state_dict()['bias']",
        ),
    )
    assert torch.equal(live["a"], torch.ones(3))
    assert live["m"] is meta and meta_model.weight.device.type == "meta"
    assert torch.equal(live["e"], torch.zeros(3, 4))


def test_a_fresh_optimizer_takes_a_stepped_ones_state(root):
    model, opt = trained(0)
    save(root, 1, {"model": model, "opt": opt})
    live_model, _ = trained(1)
    live_opt = torch.optim.AdamW(live_model.parameters(), lr=0.5)  # no state yet: that is no mismatch
    assert restore(root, {"model": live_model, "opt": live_opt}) == 1
    for p, q in zip(model.parameters(), live_model.parameters(), strict=True):
        assert torch.equal(opt.state[p]["exp_avg"], live_opt.state[q]["exp_avg"])


def test_strict_false_on_an_empty_root_returns_an_empty_result(root):
    live = {"w": torch.zeros(2)}
    assert restore(root, live, strict=False) == RestoreResult(None, (), (), ())
    assert restore(root, live) is None


# ---- load_weights ---------------------------------------------------------------------------------


def test_load_weights_strict_refuses_a_mismatch_without_a_partial_copy(root):
    model, opt = trained(0)
    save(root, 7, {"model": model, "opt": opt})
    live, _ = trained(1, bias=False)
    before = snapshot(live)
    with pytest.raises(StateMismatchError, match=r"unexpected in the checkpoint \(1\): 0.bias"):
        asyncckpt.load_weights(root, live)
    unchanged(live, before)  # torch's own strict load copied every matching tensor before raising

    result = asyncckpt.load_weights(root, live, strict=False)
    assert result == RestoreResult(7, missing_keys=(), unexpected_keys=("0.bias",), skipped=())
    assert torch.equal(live[0].weight, model[0].weight) and torch.equal(live[1].running_var, model[1].running_var)


def test_load_weights_reports_missing_keys_and_meta_tensors(root):
    save(root, 2, {"model": nn.Linear(2, 2)})
    live = nn.Sequential()
    live.add_module("lin", nn.Linear(2, 2))
    with pytest.raises(StateMismatchError):
        asyncckpt.load_weights(root, live)
    result = asyncckpt.load_weights(root, live, strict=False)
    assert result == RestoreResult(2, ("lin.weight", "lin.bias"), ("weight", "bias"), ())

    with torch.device("meta"):
        meta = nn.Linear(2, 2)
    with pytest.raises(StateMismatchError, match="weight: a meta tensor"):
        asyncckpt.load_weights(root, meta)
    assert asyncckpt.load_weights(root, meta, strict=False) == RestoreResult(2, (), (), ("weight", "bias"))


def test_strict_must_be_a_bool_and_is_checked_before_any_read(root, tmp_path):
    save(root, 2, {"model": nn.Linear(2, 2)})
    live = nn.Linear(2, 2)
    for where in (root, tmp_path / "nowhere"):  # not even a missing root is looked at first
        with pytest.raises(TypeError, match="strict must be True or False, got 'no'"):
            asyncckpt.load_weights(where, live, strict="no")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="strict must be True or False, got 0"):
        restore(root, {"model": live}, strict=0)


def test_load_weights_strict_false_gives_the_step_on_the_result(root):
    save(root, 5, {"model": nn.Linear(2, 2)})
    assert asyncckpt.load_weights(root, nn.Linear(2, 2)) == 5
    result = asyncckpt.load_weights(root, nn.Linear(2, 2), strict=False)
    assert isinstance(result, RestoreResult) and result.step + 1 == 6


# ---- malformed module metadata is damage, found by verify and skipped by restore ----------------


def _rewrite_metadata(path, change):
    manifest = path / MANIFEST_NAME
    body = json.loads(manifest.read_bytes())
    del body["crc32"]
    model_node = dict(body["tree"]["d"])["model"]["o"]
    change(model_node)
    manifest.write_bytes(seal_manifest(json.dumps(body, separators=(",", ":")).encode()))


BAD_METADATA = {
    "not a dict": lambda node: node.update(m=[1, 2]),
    "entry not a dict": lambda node: node["m"].update({"": 5}),
    "version not an int": lambda node: node["m"]["1"].update(version="2"),
    "assign flag": lambda node: node["m"][""].update(assign_to_params_buffers=True),
    "on a list node": lambda node: node.update(l=[], m={}) or node.pop("d"),
}


@pytest.mark.parametrize("case", list(BAD_METADATA))
def test_malformed_module_metadata_is_damage_and_restore_falls_back(root, case, capsys):
    model, opt = trained(0)
    save(root, 1, {"model": model, "opt": opt})
    newer, newer_opt = trained(2)
    save(root, 2, {"model": newer, "opt": newer_opt})
    _rewrite_metadata(root / step_dir_name(2), BAD_METADATA[case])

    assert cli_main(["verify", str(root)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"DAMAGED .*step-000000000002.*metadata", out), out
    assert re.search(r"ok .*step-000000000001", out)

    live, live_opt = trained(3)
    with pytest.warns(UserWarning, match="step-000000000002"):
        assert restore(root, {"model": live, "opt": live_opt}) == 1
    assert torch.equal(live[1].running_mean, model[1].running_mean)
    with pytest.warns(UserWarning, match="step-000000000002"):
        assert asyncckpt.load_weights(root, trained(4)[0]) == 1


def test_cls_must_be_a_short_string(root):
    save(root, 1, {"model": nn.Linear(2, 2)})
    manifest = root / step_dir_name(1) / MANIFEST_NAME
    body = json.loads(manifest.read_bytes())
    del body["crc32"]
    dict(body["tree"]["d"])["model"]["cls"] = {"evil": 1}
    manifest.write_bytes(seal_manifest(json.dumps(body, separators=(",", ":")).encode()))
    with pytest.raises(asyncckpt.CheckpointError, match="cls"):
        asyncckpt.load(root / step_dir_name(1))


def test_save_refuses_metadata_a_reader_would_reject(root):
    sd = nn.Linear(2, 2).state_dict()
    sd._metadata[""]["version"] = "1"  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match=re.escape("state['w']._metadata") + ".*version"):
        flatten({"w": sd})
    good = nn.BatchNorm1d(2).state_dict()
    assert flatten({"w": good}).skeleton["d"][0][1]["m"] == {"": {"version": 2}}


# ---- the asyncio façade mirrors strict -----------------------------------------------------------


def test_async_restore_mirrors_strict(root):
    import asyncio

    save(root, 4, {"w": torch.ones(2), "x": 1})

    async def go():
        async with asyncckpt.AsyncCheckpointManager(root) as mgr:
            live = {"w": torch.zeros(2)}
            with pytest.raises(StateMismatchError):
                await mgr.restore(live)
            assert torch.equal(live["w"], torch.zeros(2))
            result = await mgr.restore(live, strict=False)
            assert result == RestoreResult(4, (), ("state['x']",), ())
            assert torch.equal(live["w"], torch.ones(2))

    asyncio.run(go())


def test_a_lazy_module_takes_its_shapes_from_the_checkpoint(root):
    saved = nn.Linear(3, 2)
    save(root, 1, {"model": saved})
    lazy = nn.LazyLinear(2)
    assert restore(root, {"model": lazy}) == 1
    assert torch.equal(lazy.weight, saved.weight) and torch.equal(lazy.bias, saved.bias)


# ---- what torch's own loads accept, restore accepts -----------------------------------------------


def test_a_scheduler_built_after_a_strict_restore_finds_initial_lr(root):
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)  # adds 'initial_lr' to the groups
    for _ in range(5):
        opt.step()
        sched.step()
    save(root, 5, {"opt": opt})  # the scheduler is rebuilt on resume, not saved

    live_opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    assert restore(root, {"opt": live_opt}) == 5
    assert live_opt.param_groups[0]["initial_lr"] == 0.1 and live_opt.param_groups[0]["lr"] == 0.025
    resumed = torch.optim.lr_scheduler.StepLR(live_opt, 2, gamma=0.5, last_epoch=4)
    for optimizer, scheduler in ((opt, sched), (live_opt, resumed)):
        optimizer.step()
        scheduler.step()
    assert live_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.0125


def test_param_group_hyperparameters_load_as_torch_loads_them(root):
    model, opt = trained(0)
    for group in opt.param_groups:  # a checkpoint from an older torch, before 'differentiable'
        del group["differentiable"]
    group = opt.param_groups[0]
    group["lr"], group["custom"] = 0.5, "kept"
    save(root, 1, {"opt": opt})

    live_model, _ = trained(1)
    live_opt = torch.optim.AdamW(live_model.parameters(), lr=0.01, differentiable=False)
    live_opt.param_groups[0]["only_live"] = 3
    assert restore(root, {"opt": live_opt}) == 1  # strict: hyperparameter keys are not state keys
    live_group = live_opt.param_groups[0]
    assert live_group["lr"] == 0.5 and live_group["custom"] == "kept"  # the saved keys, as torch loads them
    assert live_group["differentiable"] is False and live_group["only_live"] == 3  # the rest as it was
    assert live_group["params"] == list(live_model.parameters())
    assert restore(root, {"opt": live_opt}, strict=False) == RestoreResult(1, (), (), ())


class _ExtraState(nn.Module):
    """Like TransformerEngine's modules: extra state pickled into a uint8 tensor whose length varies."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.meta: dict = {}

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(list(json.dumps(self.meta).encode()), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.meta = json.loads(bytes(state.tolist()))


def test_extra_state_goes_to_set_extra_state_whatever_its_shape(root):
    saved = _ExtraState()
    saved.meta = {"amax_history": [1.0, 2.0], "scale": 3.0}
    save(root, 1, {"model": saved})
    for strict in (True, False):
        live = _ExtraState()
        result = restore(root, {"model": live}, strict=strict)
        assert result == (1 if strict else RestoreResult(1))
        assert live.meta == saved.meta and torch.equal(live.lin.weight, saved.lin.weight)
    live = _ExtraState()
    assert asyncckpt.load_weights(root, live) == 1
    assert live.meta == saved.meta


class _FrozenBackbone(nn.Module):
    """LoRA-style: a state_dict hook leaves the frozen backbone out of the saved state."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(2, 2)
        self.adapter = nn.Linear(2, 2)
        self.backbone.requires_grad_(False)
        self._register_state_dict_hook(_FrozenBackbone._drop_backbone)

    @staticmethod
    def _drop_backbone(module, state_dict, prefix, local_metadata):
        for key in [k for k in state_dict if k.startswith(prefix + "backbone.")]:
            del state_dict[key]


def test_a_module_whose_state_dict_hook_leaves_keys_out_restores_and_warns(root):
    torch.manual_seed(0)
    saved = {"a": torch.full((3,), 7.0), "model": _FrozenBackbone()}
    save(root, 1, saved)
    torch.manual_seed(1)
    live = {"a": torch.zeros(3), "model": _FrozenBackbone()}
    backbone = snapshot(live["model"].backbone.weight)
    with pytest.warns(UserWarning, match=re.escape("state['model']") + ".*backbone.weight"):
        assert restore(root, live) == 1  # torch's strict load raised here, after 'a' was updated
    assert torch.equal(live["a"], saved["a"])
    assert torch.equal(live["model"].adapter.weight, saved["model"].adapter.weight)
    assert_same_tree(backbone, live["model"].backbone.weight)  # left out of the checkpoint: left as it was


def test_strict_false_inserts_checkpoint_only_keys_into_plain_dicts(root):
    model, opt = trained(0)
    save(root, 1, {"model": model.state_dict(), "opt": opt.state_dict(), "extra": {"epoch": 3, "best": 0.25}})
    live_model, live_opt = trained(1)
    live_opt = torch.optim.AdamW(live_model.parameters(), lr=1e-2)  # no state yet, as after a fresh build
    live = {"model": live_model.state_dict(), "opt": live_opt.state_dict(), "extra": {"epoch": 0}}
    before = snapshot(live)
    with pytest.raises(StateMismatchError) as excinfo:
        restore(root, live)
    assert "state['opt']['state'][0]" in str(excinfo.value) and "state['extra']['best']" in str(excinfo.value)
    unchanged(live, before)

    result = restore(root, live, strict=False)
    assert result.unexpected_keys == tuple(f"state['opt']['state'][{i}]" for i in range(6)) + (
        "state['extra']['best']",
    )
    assert live["extra"] == {"epoch": 3, "best": 0.25}
    live_model.load_state_dict(live["model"])
    live_opt.load_state_dict(live["opt"])
    for p, q in zip(model.parameters(), live_model.parameters(), strict=True):
        assert torch.equal(p, q) and torch.equal(opt.state[p]["exp_avg"], live_opt.state[q]["exp_avg"])


def test_save_strips_the_assign_load_option_from_module_metadata(root):
    saved = nn.Linear(2, 2)
    with torch.device("meta"):
        model = nn.Linear(2, 2)
    sd = saved.state_dict()
    model.load_state_dict(sd, assign=True)  # torch writes its load option into sd._metadata
    assert sd._metadata[""]["assign_to_params_buffers"] is True  # type: ignore[attr-defined]
    save(root, 1, {"model": model, "init": sd})
    assert sd._metadata[""]["assign_to_params_buffers"] is True  # type: ignore[attr-defined]  # the caller's own
    live = {"model": nn.Linear(2, 2), "init": nn.Linear(2, 2).state_dict()}
    weight = live["model"].weight
    assert restore(root, live) == 1
    assert live["model"].weight is weight and torch.equal(weight, saved.weight)  # copied, not assigned
    assert asyncckpt.load(root)["init"]._metadata == {"": {"version": 1}}


def _training_state():
    """README's full training state, freshly built."""
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2), nn.Linear(8, 8))  # [3] never used
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return {
        "model": model,
        "optimizer": opt,
        "scheduler": torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=100),
        "scaler": torch.amp.GradScaler("cpu"),
        "rng": asyncckpt.RNGState(),
        "sampler": asyncckpt.ResumableSampler(10, seed=0),
        "step": 0,
        "extra": {"epoch": 0, "best_loss": None},
    }


def test_the_readme_training_state_round_trips_strictly_into_a_fresh_one(root):
    torch.manual_seed(0)
    state = _training_state()
    model, opt = state["model"], state["optimizer"]
    for _ in range(3):
        loss = model[2](model[1](model[0](torch.randn(8, 4)))).sum()  # model[3] gets no grad: no AdamW state
        state["scaler"].scale(loss).backward()
        state["scaler"].step(opt)
        state["scaler"].update()
        opt.zero_grad()
        state["scheduler"].step()
    iterator = iter(state["sampler"])
    next(iterator), next(iterator)
    state["step"], state["extra"] = 3, {"epoch": 1, "best_loss": 0.25}
    before = snapshot(state)
    save(root, 3, state)

    torch.manual_seed(1)
    live = _training_state()
    assert restore(root, live) == 3
    assert_same_tree(before, snapshot(live))
    assert len(live["optimizer"].state) == 6  # model[3]'s two params still have none


def test_a_live_namedtuple_stays_one(tmp_path):
    """Restore rebuilt any tuple as a plain one: code reading the live state's fields by name broke."""
    import collections

    stats = collections.namedtuple("stats", ["mean", "var"])
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(5, {"stats": stats(torch.ones(3), torch.full((3,), 2.0)), "shape": torch.Size([2, 3])}).wait()
    live = {"stats": stats(torch.zeros(3), torch.zeros(3)), "shape": torch.Size([0])}
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.restore(live) == 5
    assert type(live["stats"]) is stats and torch.equal(live["stats"].var, torch.full((3,), 2.0))
    assert type(live["shape"]) is torch.Size and live["shape"] == (2, 3)


def test_a_fresh_optimizer_s_parameters_hold_its_state_to_their_shape(tmp_path):
    """A fresh optimizer has no state to compare with: a saved moment of another shape was loaded,
    and the first step after the restore failed instead of the restore."""
    param = nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([param])
    param.grad = torch.ones(3)
    opt.step()
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"opt": opt}).wait()
    other = nn.Parameter(torch.randn(5))
    fresh = torch.optim.Adam([other])
    with CheckpointManager(tmp_path) as mgr, pytest.raises(StateMismatchError) as caught:
        mgr.restore({"opt": fresh})
    assert "['state'][0]['exp_avg']: shape mismatch, the checkpoint holds (3,) for a parameter of shape (5,)" in str(
        caught.value
    )
    assert fresh.state_dict()["state"] == {}  # nothing was changed
    same = nn.Parameter(torch.randn(3))
    resumed = torch.optim.Adam([same])
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.restore({"opt": resumed}) == 1
    assert torch.equal(resumed.state[same]["exp_avg"], opt.state[param]["exp_avg"])


def test_a_module_refusing_its_extra_state_is_an_error_that_says_the_state_is_partly_restored(tmp_path):
    """No check ahead can see what a module's own set_extra_state refuses: the error must not let
    the caller believe the state unchanged, as every other restore failure leaves it."""

    class Strict(nn.Linear):
        version = 1

        def get_extra_state(self):
            return {"version": self.version}

        def set_extra_state(self, state):
            if state["version"] != self.version:
                raise ValueError(f"format version {state['version']} is not {self.version}")

    saved = Strict(3, 3)
    saved.version = 2
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, {"layer": saved}).wait()
    live = Strict(3, 3)
    with CheckpointManager(tmp_path) as mgr, pytest.raises(asyncckpt.CheckpointError) as caught:
        mgr.restore({"layer": live})
    message = str(caught.value)
    assert "Strict.load_state_dict failed: format version 2 is not 1; the state is partly restored" in message


def test_a_model_or_tensor_saved_on_its_own_restores_in_place(tmp_path):
    """save took them, while restore refused anything but a dict or list: a checkpoint the manager
    that wrote it could not restore."""
    model = nn.Linear(3, 2)
    with CheckpointManager(tmp_path / "model") as mgr:
        mgr.save(1, model).wait()
    fresh = nn.Linear(3, 2)
    with CheckpointManager(tmp_path / "model") as mgr:
        assert mgr.restore(fresh) == 1
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))
    with CheckpointManager(tmp_path / "tensor") as mgr:
        mgr.save(1, torch.arange(4.0)).wait()
        live = torch.zeros(4)
        assert mgr.restore(live) == 1 and torch.equal(live, torch.arange(4.0))
        with pytest.raises(StateMismatchError, match="the checkpoint's root is a tensor, the state is a dict"):
            mgr.restore({})
    with CheckpointManager(tmp_path / "value") as mgr:
        mgr.save(1, 5).wait()
        with pytest.raises(StateMismatchError, match=r"root is a value \(not a container\).*asyncckpt.load reads"):
            mgr.restore({})
        with pytest.raises(TypeError, match="restore updates the state in place.*not 'int'"):
            mgr.restore(5)


def test_a_list_of_values_of_another_length_is_restored_in_place(root):
    """A loop that appends to a history list it holds keeps appending to the restored one, so the
    next checkpoint holds what was restored and what came after."""
    save(root, 2, {"losses": [0.5, 0.25], "extra": {"seen": [1, 2, 3]}, "w": torch.ones(2)})
    losses, seen = [], [9]
    state = {"losses": losses, "extra": {"seen": seen}, "w": torch.zeros(2)}
    assert restore(root, state) == 2
    assert state["losses"] is losses and losses == [0.5, 0.25]
    assert state["extra"]["seen"] is seen and seen == [1, 2, 3]
    losses.append(0.125)
    save(root, 3, state)
    assert asyncckpt.load(root)["losses"] == [0.5, 0.25, 0.125]


@pytest.mark.parametrize("strict", [True, False])
def test_an_optimizer_of_another_torch_class_is_refused_before_anything_changes(root, strict):
    model = nn.Linear(4, 3)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    sgd.step()
    save(root, 7, {"model": model, "opt": sgd})
    live_model = nn.Linear(4, 3)
    live = {"model": live_model, "opt": torch.optim.Adam(live_model.parameters(), lr=1e-3)}
    before = snapshot(live)
    why = "the checkpoint holds the state of a torch.optim.SGD, not of a Adam: create a SGD to restore it"
    if strict:
        with pytest.raises(StateMismatchError) as excinfo:
            restore(root, live, strict=strict)
        assert f"state['opt'].state_dict(): {why}" in str(excinfo.value)
        unchanged(live, before)
    else:  # the matching part: the model, and the Adam left as it was
        result = restore(root, live, strict=strict)
        assert result.skipped == ("state['opt'].state_dict()",)
        assert torch.equal(live_model.weight, model.weight)
        assert_same_tree(before["opt"], snapshot(live["opt"]))
    live_model(torch.randn(2, 4)).sum().backward()
    live["opt"].step()  # still a working Adam


@pytest.mark.parametrize(("saved", "live"), [("Adam", "AdamW"), ("AdamW", "Adam")])
def test_adam_and_adamw_restore_into_each_other(root, saved, live):
    model = nn.Linear(4, 3)
    opt = getattr(torch.optim, saved)(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    save(root, 1, {"model": model, "opt": opt})
    live_model = nn.Linear(4, 3)
    live_opt = getattr(torch.optim, live)(live_model.parameters(), lr=1e-3)
    assert restore(root, {"model": live_model, "opt": live_opt}) == 1
    assert torch.equal(live_opt.state[live_model.weight]["exp_avg"], opt.state[model.weight]["exp_avg"])
    live_model(torch.randn(2, 4)).sum().backward()
    live_opt.step()


def test_a_lazy_module_and_its_optimizer_restore_bit_exact(root):
    def build():
        model = nn.Sequential(nn.LazyLinear(3), nn.ReLU(), nn.Linear(3, 2))
        return model, torch.optim.Adam(model.parameters())

    model, opt = build()
    model(torch.randn(2, 5)).sum().backward()
    opt.step()
    save(root, 1, {"model": model, "opt": opt})
    live_model, live_opt = build()  # uninitialized: its first layer's shape comes from the checkpoint
    assert restore(root, {"model": live_model, "opt": live_opt}) == 1
    assert torch.equal(live_model[0].weight, model[0].weight)
    for name, value in opt.state[model[0].weight].items():
        assert torch.equal(live_opt.state[live_model[0].weight][name], value), name
