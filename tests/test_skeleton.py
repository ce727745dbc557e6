"""The skeleton module: node kinds, the one walker, dotted keys, and validation of untrusted skeletons."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from asyncckpt.errors import CheckpointError
from asyncckpt.format import DTYPES
from asyncckpt.state import skeleton
from asyncckpt.state.skeleton import DOTTED, MAX_TREE_DEPTH, Kind, NoEntryError, kind_of, subtree, walk
from asyncckpt.state.tree import flatten


def _state() -> dict:
    torch.manual_seed(0)
    shared = torch.randn(3)
    return {
        "model": torch.nn.Linear(2, 1),
        "models": [torch.nn.Linear(1, 1), {"inner": torch.nn.Linear(1, 2)}],
        3: {"w": shared},
        "3": {"w": torch.zeros(1)},  # a str key spelled like the int key above
        5: {-1: "neg"},
        "tup": (torch.ones(2), None),
        "a.b": torch.ones(1),
        "tied": shared,
        "np": np.arange(4, dtype=np.float32),
        "empty": [],
        "dt": torch.float16,
        "dev": torch.device("cpu"),
    }


def test_kinds_are_the_letters_the_manifest_stores_and_serialise_as_them():
    assert skeleton.KINDS == {"d", "l", "t", "T", "N", "S", "v", "dt", "dev", "o", "G"}  # G: multi-rank tables only
    node = flatten({"x": [torch.ones(1), (1.5, torch.float32)], "m": torch.nn.Identity()}).skeleton
    expected = (
        '{"d": [["x", {"l": [{"T": 0}, {"t": [{"v": 1.5}, {"dt": "float32"}]}]}], '
        '["m", {"o": {"d": [], "m": {"": {"version": 1}}}, "cls": "Identity"}]]}'
    )
    assert json.dumps(node) == expected
    assert json.loads(expected) == node


def test_kind_of_names_each_node_and_refuses_an_unknown_one():
    assert kind_of({"d": [], "m": {}}) == Kind.DICT
    assert kind_of({"cls": "AdamW", "o": {"d": []}}) == Kind.OBJECT
    assert kind_of({"dev": "cpu"}) == Kind.DEVICE
    with pytest.raises(CheckpointError, match="unknown skeleton node kind 'x'"):
        kind_of({"x": 1})


def test_walk_visits_parents_first_in_saved_order_with_paths_as_messages_spell_them():
    tree = flatten({"a": [torch.ones(1), {7: "v"}], "o": torch.nn.Identity(), "t": ()}).skeleton
    visits = [(v.path, v.kind, v.depth) for v in walk(tree)]
    assert visits == [
        ("state", Kind.DICT, 0),
        ("state['a']", Kind.LIST, 1),
        ("state['a'][0]", Kind.TENSOR, 2),
        ("state['a'][1]", Kind.DICT, 2),
        ("state['a'][1][7]", Kind.VALUE, 3),
        ("state['o']", Kind.OBJECT, 1),
        ("state['o'].state_dict()", Kind.DICT, 2),
        ("state['t']", Kind.TUPLE, 1),
    ]
    assert {v.path for v in walk(tree, None)} == {""}  # no paths asked for, none built
    dotted = [v.path for v in walk(tree, "", DOTTED) if v.kind != Kind.DICT]
    assert dotted == ["a", "a.0", "a.1.7", "o", "t"]  # a saved object stands for its state dict


def test_leaves_tensor_paths_and_tensor_indices():
    tree = flatten(_state()).skeleton
    leaves = {v.path: v.kind for v in skeleton.leaves(tree)}
    assert leaves["state['empty']"] == Kind.LIST  # an empty container is a leaf
    assert leaves["state[5][-1]"] == Kind.VALUE and leaves["state['np']"] == Kind.NDARRAY
    assert "state['models']" not in leaves and "state['model']" not in leaves
    paths = skeleton.tensor_paths(tree)
    tied = tree["d"][2][1]["d"][0][1]["T"]
    assert paths[tied] == "state[3]['w']"  # the first occurrence names a tied tensor
    assert next(v.node["T"] for v in walk(tree) if v.path == "state['tied']") == tied
    assert len(paths) == len(flatten(_state()).tensors)
    models = subtree(tree, "models")
    assert skeleton.tensor_indices(models) == {paths_index for paths_index, p in paths.items() if "models" in p}
    assert skeleton.tensor_indices({"T": 4}) == {4}


@pytest.mark.parametrize(
    ("key", "path"),
    [
        ("model", "state['model'].state_dict()"),
        ("models.0", "state['models'][0].state_dict()"),  # a list index
        ("models.1.inner", "state['models'][1]['inner'].state_dict()"),
        ("models.0.weight", "state['models'][0].state_dict()['weight']"),  # into an object's state dict
        ("tup.0", "state['tup'][0]"),  # a tuple index
        ("5.-1", "state[5][-1]"),  # int dict keys written out
        ("3.w", "state['3']['w']"),  # a str key before the int key spelled the same
        ("a.b", "state['a.b']"),  # a top-level key holding a dot
    ],
)
def test_subtree_resolves_dotted_keys(key, path):
    tree = flatten(_state()).skeleton
    by_identity = {id(v.node): v.path for v in walk(tree)}
    node = subtree(tree, key)
    assert kind_of(node) != Kind.OBJECT
    assert by_identity[id(node)] == path


def test_subtree_reaches_an_optimizer_state_by_parameter_index():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    tree = flatten({"optimizer": opt}).skeleton
    node = subtree(tree, "optimizer.state.1")  # the int key 1 of the state dict
    assert sorted(k for k, _ in node["d"]) == ["exp_avg", "exp_avg_sq", "step"]


@pytest.mark.parametrize(
    ("key", "listing"),
    [
        ("nope", "(top-level keys: 'model', 'models', 3, '3', 5, 'tup', 'a.b', 'tied', 'np', 'empty', 'dt', 'dev')"),
        ("models.2", "('models' is a list of 2: indices 0 to 1)"),
        ("models.-1", "('models' is a list of 2: indices 0 to 1)"),
        ("models.1.outer", "(keys under 'models.1': 'inner')"),
        ("tup.0.x", "('tup.0' is a tensor, with no entries)"),
        ("empty.0", "('empty' is a list of 0)"),
        ("dt.x", "('dt' is a value, with no entries)"),
    ],
)
def test_a_key_naming_nothing_lists_what_exists_where_the_search_stopped(key, listing):
    tree = flatten(_state()).skeleton
    with pytest.raises(NoEntryError) as caught:
        subtree(tree, key, where="ckpt")
    assert str(caught.value) == f"ckpt has no entry {key!r} {listing}"
    assert isinstance(caught.value, CheckpointError)


def test_a_long_key_listing_is_cut():
    tree = flatten({f"k{i}": i for i in range(30)}).skeleton
    with pytest.raises(NoEntryError, match=r"'k19', \.\.\. \(30 in all\)\)$"):
        subtree(tree, "nope")


class _Refused(Exception):
    pass


def _validate(tree, dtypes=("float32",)):
    def error(where, what):
        return _Refused(f"{where}: {what}")

    skeleton.validate(tree, list(dtypes), known_dtypes=DTYPES, error=error)


def test_validate_accepts_what_flatten_makes():
    flat = flatten(_state())
    _validate(json.loads(json.dumps(flat.skeleton)), [str(t.dtype).removeprefix("torch.") for t in flat.tensors])


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ([], r"tree: node '\[\]' is not an object"),
        ({"d": [], "l": []}, "exactly one kind"),
        ({"q": 1}, "unknown node kind 'q'"),
        ({"T": 1}, r"tree tensor index: expected an integer in \[0, 0\], got 1"),
        ({"T": True}, "tree tensor index"),
        ({"N": 0}, None),  # float32 is a numpy dtype
        ({"v": {}}, "value leaf"),
        ({"dt": "float128"}, "unknown dtype leaf"),
        ({"dev": "../x"}, "bad device leaf"),
        ({"dev": "nosuchdevice"}, "unknown device"),
        ({"d": [["a", {"v": 1}], ["a", {"v": 2}]]}, "duplicate key 'a' in a dict node"),
        ({"d": [[True, {"v": 1}]]}, "str-or-int key"),
        ({"d": {"a": 1}}, "list of pairs"),
        ({"l": {}}, "must hold a list"),
        ({"l": [{"v": 1}, {"v": 1, "cls": "X"}]}, "'cls' must be a printable class name on an object node"),
        ({"o": {"d": []}, "m": {}}, "module metadata on a 'o' node"),
        ({"d": [], "m": {"": {"assign_to_params_buffers": True}}}, "load option"),
    ],
)
def test_validate_refuses_a_malformed_node(tree, message):
    if message is None:
        _validate(tree)
        return
    with pytest.raises(_Refused, match=message):
        _validate(tree)


def test_validate_refuses_a_numpy_leaf_of_a_dtype_numpy_lacks():
    with pytest.raises(_Refused, match="a numpy leaf cannot hold bfloat16"):
        _validate({"S": 0}, ["bfloat16"])


def test_deep_skeletons_cost_no_recursion():
    node: dict = {"T": 0}
    for _ in range(50_000):  # far past Python's recursion limit
        node = {"l": [node]}
    assert skeleton.tensor_indices(node) == {0}  # the walker is iterative
    with pytest.raises(_Refused, match="nested too deeply"):
        _validate(node)
    allowed: dict = {"v": 1}
    for _ in range(2 * MAX_TREE_DEPTH):
        allowed = {"o": allowed}
    _validate(allowed)


def test_a_global_leaf_is_refused_in_a_version_1_tree_and_checked_in_a_rank_table():
    def error(where, what):
        return CheckpointError(f"{where}: {what}")

    tree = {"d": [["w", {"G": 0}]]}
    with pytest.raises(CheckpointError, match="unknown node kind 'G'"):
        skeleton.validate(tree, [], known_dtypes={"float32"}, error=error)
    skeleton.validate(tree, [], known_dtypes={"float32"}, error=error, globals_count=1)
    with pytest.raises(CheckpointError, match=r"global tensor index: expected an integer in \[0, 0\], got 1"):
        skeleton.validate({"G": 1}, [], known_dtypes={"float32"}, error=error, globals_count=1)
