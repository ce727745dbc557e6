"""Parameter names: what they are, that the kept walk follows a changed model, and the state dict
keyed by them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import asyncckpt
from asyncckpt import CheckpointManager, RestoreResult, StateMismatchError
from asyncckpt.state.names import ParameterNames, keyed_by_name, module_parameter_names
from asyncckpt.state.tree import flatten


def by_name(module: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in module.named_parameters()}


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4))])
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: named once, by its first name
        self.scale = nn.Parameter(torch.ones(1))


def first_names(module: nn.Module) -> dict[int, str]:
    return {pid: names[0] for pid, names in module_parameter_names(module).items()}


def test_names_are_named_parameters_names_tied_ones_with_their_other_names_after():
    model = Tied()
    assert first_names(model) == by_name(model)
    assert module_parameter_names(model)[id(model.embed.weight)] == ["embed.weight", "head.weight"]


def test_the_kept_walk_follows_every_change_to_the_model():
    model = Tied()
    module_parameter_names(model)
    # two children swapped: each parameter takes the other name
    model.blocks[0], model.blocks[1] = model.blocks[1], model.blocks[0]
    assert first_names(model) == by_name(model)
    assert first_names(model)[id(model.blocks[0][1].weight)] == "blocks.0.1.weight"
    # a parameter replaced in its slot, one added, one deleted, a child added
    model.scale = nn.Parameter(torch.zeros(2))
    assert first_names(model)[id(model.scale)] == "scale"
    model.extra = nn.Parameter(torch.zeros(3))
    assert first_names(model)[id(model.extra)] == "extra"
    old_bias = model.blocks[0][1].bias
    del model.blocks[0][1].bias
    model.blocks[0][1].register_parameter("bias", None)
    assert id(old_bias) not in module_parameter_names(model)
    model.tail = nn.Linear(2, 2)
    assert first_names(model) == by_name(model)


def test_an_activation_checkpoint_wrapper_leaves_no_prefix():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = nn.Sequential(nn.Linear(2, 2), checkpoint_wrapper(nn.Linear(2, 3)))
    names = set(first_names(model).values())
    assert names == {"0.weight", "0.bias", "1.weight", "1.bias"} == set(model.state_dict())


def test_an_optimizer_s_names_come_from_the_state_s_modules():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    opt = torch.optim.SGD([{"params": [model[1].weight]}, {"params": [model[0].weight, model[0].bias]}], lr=0.1)
    state = {"opt": opt, "model": nn.DataParallel(model)}  # found after the optimizer, in a wrapper
    assert ParameterNames(state).of(opt) == ["1.weight", "0.weight", "0.bias"]


def test_an_optimizer_over_several_modules_prefixes_each_name_with_its_module_s_key():
    gen, disc = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = torch.optim.Adam(list(gen.parameters()) + list(disc.parameters()))
    state = {"models": {"gen": gen, "disc": [disc]}, "opt": opt}
    assert ParameterNames(state).of(opt) == [
        "models.gen.weight",
        "models.gen.bias",
        "models.disc.0.weight",
        "models.disc.0.bias",
    ]
    # an optimizer over one of them keeps that module's own names
    assert ParameterNames(state).of(torch.optim.Adam(disc.parameters())) == ["weight", "bias"]


def test_a_parameter_in_no_module_of_the_state_leaves_the_optimizer_unnamed():
    model = nn.Linear(2, 2)
    loose = nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([*model.parameters(), loose])
    assert ParameterNames({"model": model, "opt": opt}).of(opt) is None
    assert ParameterNames({"opt": opt}).of(torch.optim.Adam(model.parameters())) is None


def test_the_state_dict_keyed_by_name_keeps_order_and_values():
    model = nn.Linear(2, 2)
    opt = torch.optim.Adam([{"params": [model.bias], "lr": 0.5}, {"params": [model.weight]}])
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    named = keyed_by_name(sd, ["bias", "weight"])
    assert list(named["state"]) == ["bias", "weight"]
    assert named["state"]["weight"] is sd["state"][1]
    assert [g["params"] for g in named["param_groups"]] == [["bias"], ["weight"]]
    assert named["param_groups"][0]["lr"] == 0.5
    assert sd["param_groups"][0]["params"] == [0]  # the optimizer's own state dict is untouched


def test_a_state_dict_not_laid_out_as_torch_s_is_left_as_it_is():
    for odd in (
        {"state": {0: {}}, "param_groups": [{"params": [1, 0]}]},  # not positions in order
        {"state": {"x": {}}, "param_groups": [{"params": [0, 1]}]},  # state of no parameter
        {"state": {}, "param_groups": [{"lr": 1}]},  # a group without params
        {"param_groups": [{"params": [0, 1]}]},  # no state
        [1, 2],
    ):
        assert keyed_by_name(odd, ["a", "b"]) is odd


# ---- restore matches the optimizer's state by name -----------------------------------------------


class TwoLayers(nn.Module):
    """Two layers of one shape, defined in either order: positions swap, names do not."""

    def __init__(self, b_first: bool = False) -> None:
        super().__init__()
        if b_first:
            self.b = nn.Linear(4, 4)
            self.a = nn.Linear(4, 4)
        else:
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def train(model, opt, steps=2, seed=0):
    torch.manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def save_and_restore(tmp_path, saved, live, **kwargs):
    with CheckpointManager(tmp_path / "ckpts") as mgr:
        mgr.save(1, saved).wait()
        return mgr.restore(live, **kwargs)


def assert_state_by_name(live_model, live_opt, saved_model, saved_opt, names):
    live_params, saved_params = dict(live_model.named_parameters()), dict(saved_model.named_parameters())
    for name in names:
        mine, theirs = live_opt.state[live_params[name]], saved_opt.state[saved_params[name]]
        assert mine.keys() == theirs.keys(), name
        for key in mine:
            assert torch.equal(torch.as_tensor(mine[key]), torch.as_tensor(theirs[key])), (name, key)


def test_a_model_that_lists_its_layers_in_another_order_gets_each_layer_s_state(tmp_path):
    model = TwoLayers()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    train(model, opt)
    skeleton = flatten({"model": model, "opt": opt}).skeleton
    opt_node = dict(skeleton["d"])["opt"]["o"]
    assert [key for key, _ in dict(opt_node["d"])["state"]["d"]] == ["a.weight", "a.bias", "b.weight", "b.bias"]

    live = TwoLayers(b_first=True)  # same shapes: by position, a's state would land on b, silently
    live_opt = torch.optim.AdamW(live.parameters(), lr=0.1)
    train(live, live_opt, seed=1)
    assert save_and_restore(tmp_path, {"model": model, "opt": opt}, {"model": live, "opt": live_opt}) == 1
    assert_state_by_name(live, live_opt, model, opt, ["a.weight", "a.bias", "b.weight", "b.bias"])


def test_param_groups_built_in_another_order_take_their_own_hyperparameters_and_state(tmp_path):
    model = TwoLayers()
    opt = torch.optim.AdamW([{"params": model.a.parameters(), "lr": 0.1}, {"params": model.b.parameters(), "lr": 0.2}])
    train(model, opt)
    live = TwoLayers()
    live_opt = torch.optim.AdamW(
        [{"params": live.b.parameters(), "lr": 9.0}, {"params": [live.a.bias, live.a.weight], "lr": 9.0}]
    )
    with pytest.warns(UserWarning, match="param groups are in another order"):
        assert save_and_restore(tmp_path, {"model": model, "opt": opt}, {"model": live, "opt": live_opt}) == 1
    assert [g["lr"] for g in live_opt.param_groups] == [0.2, 0.1]
    assert [len(g["params"]) for g in live_opt.param_groups] == [2, 2]
    assert live_opt.param_groups[1]["params"][0] is live.a.bias  # the live optimizer's own order stays
    assert_state_by_name(live, live_opt, model, opt, ["a.weight", "a.bias", "b.weight", "b.bias"])
    train(live, live_opt, steps=1)  # and it steps


class WithHead(TwoLayers):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(super().forward(x))


def test_a_model_that_gained_a_head_restores_the_rest_with_strict_false(tmp_path):
    model = TwoLayers()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    train(model, opt)
    live = WithHead()
    live_opt = torch.optim.AdamW(live.parameters(), lr=0.1)
    train(live, live_opt, seed=3)
    head_state = {k: v.clone() for k, v in live_opt.state[live.head.weight].items()}
    live_state = {"model": live, "opt": live_opt}
    with pytest.raises(StateMismatchError) as excinfo:
        save_and_restore(tmp_path / "strict", {"model": model, "opt": opt}, live_state)
    assert "state['opt'].state_dict()['state']['head.weight']" in excinfo.value.missing_keys

    result = save_and_restore(tmp_path / "loose", {"model": model, "opt": opt}, live_state, strict=False)
    assert isinstance(result, RestoreResult)
    assert result.missing_keys == (
        "state['model'].state_dict()['head.weight']",
        "state['model'].state_dict()['head.bias']",
        "state['opt'].state_dict()['state']['head.weight']",
        "state['opt'].state_dict()['state']['head.bias']",
    )
    assert_state_by_name(live, live_opt, model, opt, ["a.weight", "a.bias", "b.weight", "b.bias"])
    kept = live_opt.state[live.head.weight]  # the head's own state is left as it was
    assert kept.keys() == head_state.keys() and all(torch.equal(kept[k], head_state[k]) for k in kept)
    train(live, live_opt, steps=1)


def test_a_loose_parameter_keeps_the_optimizer_numbered_and_it_restores(tmp_path):
    loose = nn.Parameter(torch.randn(3))
    opt = torch.optim.SGD([loose], lr=0.1, momentum=0.9)
    loose.grad = torch.ones(3)
    opt.step()
    skeleton = flatten({"w": loose, "opt": opt}).skeleton
    assert [key for key, _ in dict(dict(skeleton["d"])["opt"]["o"]["d"])["state"]["d"]] == [0]
    live = nn.Parameter(torch.zeros(3))
    live_opt = torch.optim.SGD([live], lr=0.1, momentum=0.9)
    assert save_and_restore(tmp_path, {"w": loose, "opt": opt}, {"w": live, "opt": live_opt}) == 1
    assert torch.equal(live_opt.state[live]["momentum_buffer"], opt.state[loose]["momentum_buffer"])


def test_a_named_optimizer_state_restored_without_its_model_pairs_by_position(tmp_path):
    model = TwoLayers()
    opt = torch.optim.AdamW(model.parameters())
    train(model, opt)
    live = TwoLayers()
    live_opt = torch.optim.AdamW(live.parameters())  # its model is not in the state: no names
    assert save_and_restore(tmp_path, {"model": model, "opt": opt}, {"opt": live_opt}, strict=False).step == 1
    assert_state_by_name(live, live_opt, model, opt, ["a.weight", "a.bias", "b.weight", "b.bias"])


class TiedLM(nn.Module):
    def __init__(self, head_first: bool = False) -> None:
        super().__init__()
        if head_first:
            self.head = nn.Linear(4, 10, bias=False)
            self.embed = nn.Embedding(10, 4)
        else:
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.head(self.norm(self.embed(x)))


def test_a_tied_parameter_is_found_by_any_of_its_names(tmp_path):
    model = TiedLM()
    opt = torch.optim.Adam(model.parameters())
    model(torch.tensor([1, 2])).sum().backward()
    opt.step()
    live = TiedLM(head_first=True)  # the tied weight is "head.weight" first now
    live_opt = torch.optim.Adam(live.parameters())
    assert [n for n, _ in live.named_parameters()][0] == "head.weight"
    assert save_and_restore(tmp_path, {"model": model, "opt": opt}, {"model": live, "opt": live_opt}) == 1
    saved = opt.state[model.embed.weight]
    assert torch.equal(live_opt.state[live.embed.weight]["exp_avg"], saved["exp_avg"])
    assert torch.equal(live_opt.state[live.norm.weight]["exp_avg"], opt.state[model.norm.weight]["exp_avg"])


class IndexedAdamW(torch.optim.AdamW):
    """An optimizer whose load_state_dict looks parameters up by number (as ZeroRedundancyOptimizer does)."""

    def load_state_dict(self, state_dict):
        params = [i for group in state_dict["param_groups"] for i in group["params"]]
        assert params == list(range(len(params))) and all(type(k) is int for k in state_dict["state"]), params
        super().load_state_dict(state_dict)


def test_the_optimizer_s_own_load_gets_its_state_numbered_and_torch_s_param_names_stay_its_own(tmp_path):
    model = TwoLayers()
    opt = torch.optim.AdamW(model.named_parameters(), lr=0.1)  # torch's named param groups
    train(model, opt)
    live = TwoLayers(b_first=True)
    live_opt = IndexedAdamW(live.named_parameters(), lr=0.1)
    assert save_and_restore(tmp_path, {"model": model, "opt": opt}, {"model": live, "opt": live_opt}) == 1
    assert_state_by_name(live, live_opt, model, opt, ["a.weight", "a.bias", "b.weight", "b.bias"])
    assert live_opt.param_groups[0]["param_names"] == ["b.weight", "b.bias", "a.weight", "a.bias"]


def test_param_groups_in_another_order_warn_that_schedulers_stay_positional(tmp_path):
    model = TwoLayers()
    opt = torch.optim.SGD([{"params": model.a.parameters()}, {"params": model.b.parameters()}], lr=0.1)
    live = TwoLayers()
    live_opt = torch.optim.SGD([{"params": live.b.parameters()}, {"params": live.a.parameters()}], lr=0.1)
    with pytest.warns(UserWarning, match=r"saved group 1 is group 0 now, saved group 0 is group 1 now.*by position"):
        save_and_restore(tmp_path, {"model": model, "opt": opt}, {"model": live, "opt": live_opt})


def test_the_kept_walk_holds_no_model_alive():
    import gc
    import weakref

    model = Tied()
    opt = torch.optim.Adam(model.parameters())
    assert ParameterNames({"model": model}).of(opt) is not None
    gone = weakref.ref(model)
    del model, opt
    gc.collect()
    assert gone() is None


def test_a_reregistered_child_changes_which_name_of_a_tied_parameter_comes_first():
    model = nn.Module()
    model.enc = nn.Linear(2, 2)
    model.dec = nn.Linear(2, 2)
    model.dec.weight = model.enc.weight  # tied: first named "enc.weight"
    assert module_parameter_names(model)[id(model.enc.weight)] == ["enc.weight", "dec.weight"]
    enc = model.enc
    del model.enc
    model.enc = enc  # "dec.weight" comes first in a fresh walk now
    assert module_parameter_names(model)[id(enc.weight)] == ["dec.weight", "enc.weight"]
    assert first_names(model) == by_name(model)


def test_torch_s_own_load_takes_the_named_state_dict_that_load_returns(tmp_path):

    model = TwoLayers()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    train(model, opt)
    with CheckpointManager(tmp_path / "ckpts") as mgr:
        mgr.save(1, {"model": model, "opt": opt}).wait()
    saved = asyncckpt.load(tmp_path / "ckpts")["opt"]
    assert list(saved["state"]) == ["a.weight", "a.bias", "b.weight", "b.bias"]
    live = TwoLayers()
    live_opt = torch.optim.AdamW(live.parameters(), lr=0.5)
    live_opt.load_state_dict(saved)  # by position, as torch does: the same order here
    assert_state_by_name(live, live_opt, model, opt, ["a.weight", "a.bias", "b.weight", "b.bias"])
    assert live_opt.param_groups[0]["lr"] == 0.1


# ---- the kept walk against a fresh one, as the model changes --------------------------------------


def fresh_names(module: nn.Module) -> dict[int, set[str]]:
    """Every parameter's names by ``named_modules(remove_duplicate=False)``, computed here."""
    out: dict[int, set[str]] = {}
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for attr, p in owner._parameters.items():
            if p is not None:
                out.setdefault(id(p), set()).add(f"{prefix}.{attr}" if prefix else attr)
    return out


def test_a_shared_module_has_a_name_for_each_place():
    model = nn.Module()
    head = nn.Linear(2, 2)
    model.a = head
    model.b = head
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    state = {"model": model, "opt": opt}
    assert ParameterNames(state).aliases(opt) == [["a.weight", "b.weight"], ["a.bias", "b.bias"]]
    assert ParameterNames(state).of(opt) == ["a.weight", "a.bias"]
    del model.a
    model.a = head  # "b" comes first now: a save may still store "a.weight", which a restore finds
    assert ParameterNames(state).of(opt) in (["a.weight", "a.bias"], ["b.weight", "b.bias"])
    assert ParameterNames(state).aliases(opt) == [["b.weight", "a.weight"], ["b.bias", "a.bias"]]


def test_random_changes_to_a_model_keep_the_names_a_fresh_walk_gives():
    import random

    rng = random.Random(7)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)) for _ in range(4)])
    checked = 0
    for _ in range(300):
        blocks = list(model)
        block, other = rng.choice(blocks), rng.choice(blocks)
        op = rng.randrange(7)
        if op == 0:  # swap two children of a block
            block[0], block[1] = block[1], block[0]
        elif op == 1:  # a parameter replaced
            block[0].weight = nn.Parameter(torch.zeros(2, 2))
        elif op == 2:  # tie two blocks' weights
            other[1].weight = block[0].weight
        elif op == 3 and len(other) < 4:  # share a layer into another block
            other.append(block[0])
        elif op == 4 and len(other) > 2:  # a child removed
            del other[len(other) - 1]
        elif op == 5:  # a parameter added
            setattr(block[1], f"extra{rng.randrange(3)}", nn.Parameter(torch.zeros(1)))
        elif op == 6:  # a parameter removed
            block[1].bias = None
        if rng.random() < 0.5:
            params = list(model.parameters())
            opt = torch.optim.SGD(params, lr=0.1)
            fresh = fresh_names(model)
            state = {"model": model, "opt": opt}
            saved = ParameterNames(state).of(opt)  # the kept walks, as a save uses them
            assert saved is not None and all(name in fresh[id(p)] for name, p in zip(saved, params, strict=True))
            aliases = ParameterNames(state).aliases(opt)  # as a restore finds them
            assert aliases is not None and [set(a) for a in aliases] == [fresh[id(p)] for p in params]
            checked += 1
    assert checked > 100


def test_an_untied_parameter_loses_its_other_name():
    model = Tied()
    opt = torch.optim.Adam(model.parameters())
    state = {"model": model, "opt": opt}
    assert ["embed.weight", "head.weight"] in ParameterNames(state).aliases(opt)
    model.head.weight = nn.Parameter(torch.zeros(10, 4))  # untied; the optimizer keeps the old one
    aliases = ParameterNames(state).aliases(opt)
    assert aliases is not None and ["embed.weight"] in aliases and ["embed.weight", "head.weight"] not in aliases


def test_a_parameter_in_no_module_is_not_walked_for_at_every_save(monkeypatch):
    from asyncckpt.state import names as names_module

    model = Tied()
    loose = nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([*model.parameters(), loose])
    state = {"model": model, "opt": opt}
    assert ParameterNames(state).of(opt) is None
    walks = []
    walk = names_module._walk
    monkeypatch.setattr(names_module, "_walk", lambda module: walks.append(module) or walk(module))
    for _ in range(3):
        assert ParameterNames(state).of(opt) is None
    assert walks == []
    model.extra = loose  # it joins the model: the model has a new entry and is walked again
    assert ParameterNames(state).of(opt) is not None and walks == [model]


def test_a_loose_parameter_put_in_an_existing_slot_is_named_at_the_next_save():
    model = nn.Linear(2, 2, bias=False)
    loose = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([model.weight, loose], lr=0.1)
    state = {"model": model, "opt": opt}
    assert ParameterNames(state).of(opt) is None
    model.bias = loose  # the "bias" entry was there (None): no entry added
    assert ParameterNames(state).of(opt) == ["weight", "bias"]


# ---- torch.compile's wrapper: saved as its bare module -------------------------------------------


def compiled(model: nn.Module) -> nn.Module:
    wrapper = torch.compile(model)  # compiles at its first call only: these tests never call it
    assert list(wrapper.state_dict())[0].startswith("_orig_mod.")
    return wrapper


def assert_same_state(model, opt, other_model, other_opt):
    theirs = other_model.state_dict()
    assert model.state_dict().keys() == theirs.keys()
    for name, mine in model.state_dict().items():
        assert torch.equal(mine, theirs[name]), name
    assert_state_by_name(model, opt, other_model, other_opt, [n for n, _ in model.named_parameters()])


def restores_bare_and_compiled(mgr, root, model, opt):
    """``restore`` and ``load_weights`` into a bare model, then a compiled one, give the saved state."""
    for wrap in (lambda m: m, compiled):
        live = TwoLayers(b_first=True)
        live_opt = torch.optim.AdamW(live.parameters(), lr=0.1)
        assert mgr.restore({"model": wrap(live), "opt": live_opt}) == 1
        assert_same_state(live, live_opt, model, opt)
        other = TwoLayers()
        assert asyncckpt.load_weights(root, wrap(other)) == 1
        assert all(torch.equal(a, b) for a, b in zip(other.parameters(), model.parameters(), strict=True))


def test_a_compiled_model_is_saved_with_its_bare_keys_and_restores_compiled_or_not(tmp_path):
    model = TwoLayers()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    train(model, opt)
    saved = {"model": compiled(model), "opt": opt}
    with CheckpointManager(tmp_path / "ckpts") as mgr:
        mgr.save(1, saved).wait()
        loaded = asyncckpt.load(tmp_path / "ckpts")
        assert list(loaded["model"]) == ["a.weight", "a.bias", "b.weight", "b.bias"]
        assert list(loaded["opt"]["state"]) == ["a.weight", "a.bias", "b.weight", "b.bias"]
        restores_bare_and_compiled(mgr, tmp_path / "ckpts", model, opt)


def test_a_bare_model_s_checkpoint_restores_into_the_compiled_model(tmp_path):
    model = TwoLayers()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    train(model, opt)
    live = TwoLayers()
    live_opt = torch.optim.AdamW(live.parameters(), lr=0.1)
    assert save_and_restore(tmp_path, {"model": model, "opt": opt}, {"model": compiled(live), "opt": live_opt}) == 1
    assert_same_state(live, live_opt, model, opt)


def ddp_only(obj):
    """What earlier versions unwrapped: DDP, not torch.compile's wrapper."""
    while isinstance(obj, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        obj = obj.module
    return obj


def save_as_earlier_versions(monkeypatch, mgr, step, state):
    """Save as earlier versions did: a compiled model's own state dict and parameter names, every
    key under ``_orig_mod.``."""
    from asyncckpt.state import names, shards, tree

    with monkeypatch.context() as patched:
        for module in (names, shards, tree):
            patched.setattr(module, "unwrap_module", ddp_only)
        patched.setattr(names, "_WRAPPER_SEGMENTS", frozenset({"_checkpoint_wrapped_module"}))
        patched.setattr(names, "_WALKS", type(names._WALKS)())
        mgr.save(step, state).wait()


def test_a_checkpoint_of_a_compiled_model_with_prefixed_keys_still_restores(tmp_path, monkeypatch):
    model = TwoLayers()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    train(model, opt)
    with CheckpointManager(tmp_path / "ckpts") as mgr:
        save_as_earlier_versions(monkeypatch, mgr, 1, {"model": compiled(model), "opt": opt})
        loaded = asyncckpt.load(tmp_path / "ckpts")
        prefixed = ["_orig_mod.a.weight", "_orig_mod.a.bias", "_orig_mod.b.weight", "_orig_mod.b.bias"]
        assert list(loaded["model"]) == prefixed and list(loaded["opt"]["state"]) == prefixed
        restores_bare_and_compiled(mgr, tmp_path / "ckpts", model, opt)


def test_a_compiled_ddp_model_s_checkpoint_restores_whichever_version_wrote_it(tmp_path, monkeypatch):
    """``torch.compile(DDP(model))``: earlier versions keyed it ``_orig_mod.module.``; a job of one
    rank, so the many-rank restore's reads are in play too."""
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        model = TwoLayers()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(ddp.parameters(), lr=0.1)
        train(ddp, opt)
        with CheckpointManager(tmp_path / "ckpts", keep_last=None) as mgr:
            save_as_earlier_versions(monkeypatch, mgr, 1, {"model": compiled(ddp), "opt": opt})
            mgr.save(2, {"model": compiled(ddp), "opt": opt}).wait()
            assert list(asyncckpt.load(tmp_path / "ckpts", step=1)["model"])[0] == "_orig_mod.module.a.weight"
            assert list(asyncckpt.load(tmp_path / "ckpts", step=2)["model"])[0] == "a.weight"
            for step in (1, 2):
                for wrap in (lambda m: m, compiled, lambda m: compiled(nn.parallel.DistributedDataParallel(m))):
                    live = TwoLayers(b_first=True)
                    live_opt = torch.optim.AdamW(live.parameters(), lr=0.1)
                    assert mgr.restore({"model": wrap(live), "opt": live_opt}, step=step) == step
                    assert_same_state(live, live_opt, model, opt)
    finally:
        dist.destroy_process_group()


def test_an_earlier_version_s_name_goes_to_one_parameter_the_likeliest_first():
    from asyncckpt.state.tree import _saved_names_of

    # a compiled model holding `module.lin` and `lin`: each name to its own parameter
    old = ["_orig_mod.module.lin.weight", "_orig_mod.lin.weight"]
    assert _saved_names_of([["module.lin.weight"], ["lin.weight"]], old) == old
    assert _saved_names_of([["lin.weight"], ["module.lin.weight"]], old) == old[::-1]
    # only `module.lin` was saved: a `lin` added since takes nothing (it is missing)
    assert _saved_names_of([["lin.weight"], ["module.lin.weight"]], old[:1]) == [None, old[0]]
    # a compiled DDP model's name stands for the bare one; exact names come first
    assert _saved_names_of([["lin.weight"]], old[:1]) == old[:1]
    assert _saved_names_of([["lin.weight"]], ["lin.weight", "_orig_mod.lin.weight"]) == ["lin.weight"]
    # two names standing for one: neither is guessed
    assert _saved_names_of([["a.x"]], ["a._orig_mod.x", "_orig_mod.a.x"]) == [None]
    # a compiled DDP model whose module has a child named `module`: one reading for every name
    ddp = ["_orig_mod.module.0.weight", "_orig_mod.module.module.0.weight"]
    assert _saved_names_of([["0.weight"], ["module.0.weight"]], ddp) == ddp


def test_names_lose_only_whole_wrapper_segments():
    model = nn.Sequential()
    model.add_module("enc_orig_mod", nn.Linear(2, 2))
    assert set(first_names(model).values()) == {"enc_orig_mod.weight", "enc_orig_mod.bias"}


def test_a_submodule_compiled_on_its_own_leaves_no_prefix_in_the_optimizer_s_names():
    model = nn.Sequential(nn.Linear(2, 2), torch.compile(nn.Linear(2, 3)))
    assert "1._orig_mod.weight" in model.state_dict()  # the module's own keys keep it, as torch gives them
    assert set(first_names(model).values()) == {"0.weight", "0.bias", "1.weight", "1.bias"}
