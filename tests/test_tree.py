"""tree.py: flatten / unflatten / check_compatible / restore_into.

Round trips go through what a real checkpoint does to the two halves of a FlatState: the skeleton
through JSON text, every tensor through its raw bytes. Comparisons are bit-exact (raw bytes), so
NaN payloads, -0.0 and odd float8/float4 bit patterns all count.
"""

from __future__ import annotations

import collections
import json
import math
import re

import numpy as np
import pytest
import torch

from _trees import NoMemory
from asyncckpt import CheckpointError, RestoreResult, StateMismatchError
from asyncckpt.codec import tensor_memoryview
from asyncckpt.format import DTYPES
from asyncckpt.state.tree import MAX_DEPTH, check_compatible, flatten, restore_into, unflatten


def raw_bytes(t: torch.Tensor) -> bytes:
    dense = t.detach().contiguous()  # keep it alive while its memory is read
    return bytes(tensor_memoryview(dense))


def through_bytes(t: torch.Tensor) -> torch.Tensor:
    """A fresh tensor rebuilt from ``t``'s bytes alone (as a loader would)."""
    data = bytearray(raw_bytes(t))
    out = torch.empty(t.shape, dtype=t.dtype)
    if data:
        out.view(-1).view(torch.uint8).copy_(torch.frombuffer(data, dtype=torch.uint8))
    return out


def roundtrip(state):
    flat = flatten(state)
    skeleton = json.loads(json.dumps(flat.skeleton))
    tensors = [through_bytes(t) for t in flat.tensors]
    return flat, skeleton, tensors, unflatten(skeleton, tensors)


def random_bits(dtype: torch.dtype, shape=(3, 5)) -> torch.Tensor:
    n = math.prod(shape)
    gen = torch.Generator().manual_seed(1234)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


# ---- round trips --------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_format_dtype_round_trips_bit_exact(name):
    dtype = DTYPES[name]
    original = random_bits(dtype)
    flat, skeleton, tensors, restored = roundtrip({"t": original})
    assert skeleton == {"d": [["t", {"T": 0}]]}
    assert len(flat.tensors) == 1 and flat.paths == ["state['t']"]
    out = restored["t"]
    assert isinstance(out, torch.Tensor)
    assert out.dtype == dtype and out.shape == original.shape
    assert raw_bytes(out) == raw_bytes(original)


def test_containers_and_scalars_round_trip():
    state = {
        "str": "héllo ✓",
        7: "int key",
        -3: {"nested": [1, 2.5, None]},
        "none": None,
        "true": True,
        "false": False,
        "int": 2**80,
        "neg": -5,
        "float": 0.1,
        "big": 1.7976931348623157e308,
        "negzero": -0.0,
        "inf": float("-inf"),
        "nan": float("nan"),
        "list": [1, [2, [3, ()]], {"k": (4, 5)}],
        "tuple": (1, "two", (3.0,), []),
        "dtype": torch.bfloat16,
        "dtypes": [torch.float32, torch.int64, torch.bool, torch.float8_e4m3fn],
        "device": torch.device("cpu"),
        "cuda": torch.device("cuda", 1),
        "empty": {},
    }
    _, _, tensors, out = roundtrip(state)
    assert tensors == []
    assert list(out) == list(state)  # key order and int keys survive
    assert 7 in out and -3 in out and "7" not in out
    assert out[7] == "int key" and out[-3] == {"nested": [1, 2.5, None]}
    assert out["str"] == state["str"]
    assert out["none"] is None and out["true"] is True and out["false"] is False
    assert type(out["int"]) is int and out["int"] == 2**80
    assert type(out["neg"]) is int and out["neg"] == -5
    assert out["float"] == 0.1 and out["big"] == state["big"]
    assert out["negzero"] == 0.0 and math.copysign(1.0, out["negzero"]) == -1.0
    assert out["inf"] == float("-inf") and math.isnan(out["nan"])
    assert out["list"] == [1, [2, [3, ()]], {"k": (4, 5)}]
    assert isinstance(out["list"][1][1][1], tuple) and isinstance(out["list"][2]["k"], tuple)
    assert out["tuple"] == (1, "two", (3.0,), [])
    assert isinstance(out["tuple"], tuple) and isinstance(out["tuple"][3], list)
    assert out["dtype"] is torch.bfloat16
    assert out["dtypes"] == [torch.float32, torch.int64, torch.bool, torch.float8_e4m3fn]
    assert out["device"] == torch.device("cpu") and isinstance(out["device"], torch.device)
    assert out["cuda"] == torch.device("cuda:1")
    assert out["empty"] == {}


@pytest.mark.parametrize("top", [[1, "a", None], (1, "a", None), 3.5, "s", None, True, 12])
def test_top_level_need_not_be_a_dict(top):
    _, _, _, out = roundtrip(top)
    assert out == top and type(out) is type(top)


def test_tensors_inside_containers_keep_their_places():
    a, b, c = torch.randn(2, 3), torch.arange(5), torch.tensor(3.25, dtype=torch.float64)
    state = {"x": [a, {"y": (b, c)}], 0: torch.zeros(0, 4)}
    flat, _, _, out = roundtrip(state)
    assert flat.paths == ["state['x'][0]", "state['x'][1]['y'][0]", "state['x'][1]['y'][1]", "state[0]"]
    assert raw_bytes(out["x"][0]) == raw_bytes(a)
    assert torch.equal(out["x"][1]["y"][0], b) and isinstance(out["x"][1]["y"], tuple)
    assert out["x"][1]["y"][1].shape == () and out["x"][1]["y"][1].item() == 3.25
    assert out[0].shape == (0, 4)


def test_numpy_arrays_round_trip():
    arrays = {
        "f32": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
        "i64": np.array([-(2**62), 0, 2**62], dtype=np.int64),
        "bool": np.array([True, False, True]),
        "u8": np.arange(10, dtype=np.uint8),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "strided": np.arange(20.0)[::3],
        "zero_d": np.array(2.5),
    }
    flat, skeleton, _, out = roundtrip(arrays)
    assert all(node == {"N": i} for i, (_, node) in enumerate(skeleton["d"]))
    for key, original in arrays.items():
        got = out[key]
        assert isinstance(got, np.ndarray), key
        assert got.dtype == original.dtype and got.shape == original.shape, key
        assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(original).tobytes(), key


def test_numpy_array_with_negative_strides_round_trips():
    """A reversed view is an ordinary numpy array; torch tensors of any stride are supported."""
    original = np.arange(6.0)[::-1]
    _, _, _, out = roundtrip({"a": original})
    assert isinstance(out["a"], np.ndarray)
    assert out["a"].tolist() == [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]


def test_non_native_byte_order_numpy_array_is_saved_or_rejected_naming_the_path():
    original = np.arange(3, dtype=">f4")
    try:
        _, _, _, out = roundtrip({"a": [original]})
    except TypeError as exc:  # the documented way to refuse: a TypeError that names the path
        assert "state['a'][0]" in str(exc)
    else:
        assert out["a"][0].tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize(
    "scalar",
    [np.float32(1.25), np.float16(-0.5), np.int64(-(2**40)), np.uint8(200), np.bool_(True), np.complex64(1 - 2j)],
    ids=lambda s: type(s).__name__,
)
def test_numpy_scalars_round_trip_with_their_type(scalar):
    flat, skeleton, _, out = roundtrip({"s": scalar})
    assert skeleton == {"d": [["s", {"S": 0}]]}
    assert type(out["s"]) is type(scalar)
    assert out["s"] == scalar


def test_numpy_float64_scalar_keeps_its_value():
    _, _, _, out = roundtrip({"s": np.float64(0.1)})
    assert isinstance(out["s"], float) and out["s"] == 0.1


class Counter:
    """A minimal stateful object (not a torch type)."""

    def __init__(self, count=0):
        self.count = count
        self.history = [count]

    def state_dict(self):
        return {"count": self.count, "history": list(self.history)}

    def load_state_dict(self, state):
        self.count = state["count"]
        self.history = list(state["history"])


def test_stateful_objects_become_their_state_dicts():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    state = {"model": model, "optimizer": opt, "counter": Counter(5)}
    _, skeleton, _, out = roundtrip(state)
    nodes = dict(skeleton["d"])
    assert nodes["model"]["cls"] == "Sequential" and "o" in nodes["model"]
    assert nodes["optimizer"]["cls"] == "AdamW"
    assert nodes["counter"]["cls"] == "Counter"
    assert out["counter"] == {"count": 5, "history": [5]}

    expected = model.state_dict()
    assert list(out["model"]) == list(expected)
    for key, value in expected.items():
        assert value.dtype == out["model"][key].dtype
        assert raw_bytes(value) == raw_bytes(out["model"][key]), key
    # the plain trees load back into fresh objects
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    fresh.load_state_dict(out["model"])
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.5)
    fresh_opt.load_state_dict(out["optimizer"])
    assert fresh_opt.param_groups[0]["lr"] == 1e-3
    assert torch.equal(fresh_opt.state[fresh[0].weight]["exp_avg"], opt.state[model[0].weight]["exp_avg"])


def test_a_module_is_flattened_to_detached_tensors_over_its_parameters():
    net = torch.nn.Linear(3, 2)
    flat = flatten({"net": net})
    assert flat.paths == ["state['net'].state_dict()['weight']", "state['net'].state_dict()['bias']"]
    for t, p in zip(flat.tensors, (net.weight, net.bias), strict=True):
        assert not t.requires_grad and t.data_ptr() == p.data_ptr()


def test_a_tensor_as_deep_as_allowed_is_saved_and_one_level_deeper_is_refused():
    def nested(levels: int) -> dict:
        state: object = torch.ones(2)
        for _ in range(levels):
            state = {"a": state}
        return state  # type: ignore[return-value]

    assert len(flatten(nested(MAX_DEPTH)).tensors) == 1
    with pytest.raises(ValueError, match=re.escape("state" + "['a']" * (MAX_DEPTH + 1)) + ": state is nested deeper"):
        flatten(nested(MAX_DEPTH + 1))


def test_a_module_whose_state_dict_takes_no_arguments_is_saved_through_it():
    class Custom(torch.nn.Linear):
        def state_dict(self):  # an override without torch's keyword arguments
            return {"w": self.weight.detach() * 2}

    net = Custom(3, 2)
    flat = flatten({"net": net})
    assert flat.paths == ["state['net'].state_dict()['w']"]
    assert torch.equal(flat.tensors[0], net.weight.detach() * 2)


def test_a_state_dict_post_hook_sees_what_the_module_s_own_state_dict_gives_it():
    net = torch.nn.Linear(3, 2)

    def post(module, sd, prefix, local_metadata):  # numpy() refuses a tensor that requires grad
        sd[prefix + "weight_sum"] = torch.from_numpy(sd[prefix + "weight"].numpy().sum(keepdims=True))

    net.register_state_dict_post_hook(post)
    flat = flatten({"net": net})
    assert flat.paths[-1] == "state['net'].state_dict()['weight_sum']"
    assert torch.equal(flat.tensors[-1], torch.from_numpy(net.weight.detach().numpy().sum(keepdims=True)))


def test_a_module_whose_state_dict_is_replaced_on_the_instance_is_saved_through_it():
    net = torch.nn.Linear(3, 2)
    net.state_dict = lambda: {"w": net.weight.detach() * 2}
    flat = flatten({"net": net})
    assert flat.paths == ["state['net'].state_dict()['w']"]
    assert torch.equal(flat.tensors[0], net.weight.detach() * 2)


def test_module_state_dict_metadata_is_preserved():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    original = model.state_dict()
    assert original._metadata  # torch records per-module versions here
    _, _, _, out = roundtrip({"m": model})
    assert isinstance(out["m"], collections.OrderedDict)
    assert out["m"]._metadata == original._metadata


def test_ordered_dict_metadata_is_preserved():
    od = collections.OrderedDict([("b", 1), ("a", 2)])
    od._metadata = {"": {"version": 2}, "sub": {"version": 1, "tags": ["x", None]}}
    _, skeleton, _, out = roundtrip({"od": od, "plain": {"k": 1}})
    assert dict(skeleton["d"])["od"]["m"] == od._metadata
    assert list(out["od"].items()) == [("b", 1), ("a", 2)]
    assert out["od"]._metadata == od._metadata
    assert not hasattr(out["plain"], "_metadata")


# ---- tied and non-contiguous tensors ------------------------------------------------------------


def test_tied_tensors_are_stored_once_and_come_back_tied():
    w = torch.randn(4, 4)
    state = {"a": w, "b": [w], "c": w.view(4, 4), "d": w.detach()}
    flat, skeleton, _, out = roundtrip(state)
    assert len(flat.tensors) == 1
    assert flat.paths == ["state['a']"]
    assert [node for _, node in skeleton["d"]] == [{"T": 0}, {"l": [{"T": 0}]}, {"T": 0}, {"T": 0}]
    assert out["a"] is out["b"][0] is out["c"] is out["d"]
    assert raw_bytes(out["a"]) == raw_bytes(w)


def test_weight_tying_across_modules_is_stored_once():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    flat, _, _, out = roundtrip({"emb": emb, "head": head})
    assert len(flat.tensors) == 1
    assert out["emb"]["weight"] is out["head"]["weight"]


def test_different_views_of_one_storage_are_separate_tensors():
    base = torch.arange(24.0).reshape(4, 6)
    state = {
        "base": base,
        "row": base[1],
        "transposed": base.t(),
        "cols": base[:, ::2],
        "flat": base.view(-1),
        "as_int": base.view(torch.int32),
    }
    flat, _, _, out = roundtrip(state)
    assert len(flat.tensors) == len(state)
    for key, value in state.items():
        assert out[key].shape == value.shape and out[key].dtype == value.dtype, key
        assert raw_bytes(out[key]) == raw_bytes(value), key


def test_views_alike_at_other_offsets_or_over_other_memory_are_separate_tensors():
    base = torch.arange(24.0).reshape(4, 6)
    other = base.clone()
    flat, skeleton, _, out = roundtrip({"r1": base[1], "r2": base[2], "again": base[1], "o1": other[1]})
    assert len(flat.tensors) == 3  # base[1] twice is one stored tensor; the others are each their own
    index = {key: child["T"] for key, child in skeleton["d"]}
    assert index["r1"] == index["again"] and len({index["r1"], index["r2"], index["o1"]}) == 3
    assert [out[k].tolist() for k in ("r1", "r2", "o1")] == [base[1].tolist(), base[2].tolist(), other[1].tolist()]


def test_non_contiguous_tensors_round_trip():
    base = torch.randn(6, 8, dtype=torch.float64)
    state = {"t": base.t(), "step": base[::2, 1::3], "expanded": torch.tensor([1, 2]).expand(3, 2)}
    for value in state.values():
        assert not value.is_contiguous()
    _, _, _, out = roundtrip(state)
    for key, value in state.items():
        assert torch.equal(out[key], value), key
        assert raw_bytes(out[key]) == raw_bytes(value), key


def test_distinct_empty_tensors_are_not_merged():
    flat, _, _, out = roundtrip({"a": torch.zeros(0), "b": torch.zeros(0, 3, dtype=torch.int8)})
    assert len(flat.tensors) == 2
    assert out["a"].shape == (0,) and out["b"].shape == (0, 3) and out["b"].dtype == torch.int8


# ---- rejected inputs ----------------------------------------------------------------------------


class NoState:
    pass


class OnlyStateDict:
    def state_dict(self):
        return {}


@pytest.mark.parametrize(
    ("state", "path", "what"),
    [
        ({"a": [{1, 2}]}, "state['a'][0]", "set"),
        ({"a": [lambda: 0]}, "state['a'][0]", "function"),
        ({"a": {"b": NoState()}}, "state['a']['b']", "NoState"),
        ({"a": [OnlyStateDict()]}, "state['a'][0]", "OnlyStateDict"),
        ({"a": {"b": (1, frozenset())}}, "state['a']['b'][1]", "frozenset"),
        ({"a": [b"bytes"]}, "state['a'][0]", "bytes"),
        ({"a": [1 + 2j]}, "state['a'][0]", "complex"),
    ],
)
def test_unsupported_leaves_raise_type_error_naming_the_path(state, path, what):
    with pytest.raises(TypeError, match=re.escape(path) + ".*" + what):
        flatten(state)


def test_dict_with_tuple_keys_is_rejected_naming_the_path():
    with pytest.raises(TypeError, match=re.escape("state['a'][0]") + r".*\(1, 2\).*tuple"):
        flatten({"a": [{(1, 2): "x"}]})


def test_dict_with_bool_keys_is_rejected_naming_the_path():
    with pytest.raises(TypeError, match=re.escape("state['a']") + ".*True.*bool"):
        flatten({"a": {True: 1}})


@pytest.mark.parametrize("offset", [0, 2])
def test_a_tensor_with_no_memory_of_its_own_is_rejected_naming_the_path(offset):
    state = {"a": NoMemory((3,), offset), "b": {"c": NoMemory((3,), offset)}}
    with pytest.raises(TypeError, match=re.escape("state['a']: the memory of this ") + ".*NoMemory cannot be read"):
        flatten(state)
    with pytest.raises(TypeError, match=re.escape("state['b']['c']: the memory of this ")):
        flatten({"b": state["b"]})


def test_sparse_tensor_is_rejected_naming_the_path():
    with pytest.raises(TypeError, match=re.escape("state['a'][0]") + ".*sparse"):
        flatten({"a": [torch.eye(3).to_sparse()]})


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
def test_a_nested_tensor_is_rejected_naming_the_path(layout):
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=layout)
    with pytest.raises(TypeError, match=re.escape("state['m']['layers'][1]: ") + ".*not supported"):
        flatten({"m": {"layers": [torch.ones(2), nested]}})


def test_meta_tensor_is_rejected_naming_the_path():
    with pytest.raises(TypeError, match=re.escape("state['m']") + ".*meta"):
        flatten({"m": torch.empty(3, device="meta")})


def test_error_inside_a_stateful_object_names_the_state_dict_path():
    class Holder(Counter):
        def state_dict(self):
            return {"bad": {1, 2}}

    with pytest.raises(TypeError, match=re.escape("state['h'].state_dict()['bad']")):
        flatten({"h": Holder()})


def test_dtype_leaf_the_format_cannot_load_is_rejected_at_save_time():
    """flatten accepts any torch.dtype, but format.py only loads names in DTYPES: a state holding
    torch.quint8 saves fine and then can never be loaded. It must be refused when saving."""
    assert "quint8" not in DTYPES
    with pytest.raises(TypeError, match=re.escape("state['cfg']['dtype']")):
        flatten({"cfg": {"dtype": torch.quint8}})


# ---- check_compatible ---------------------------------------------------------------------------


def test_check_compatible_names_the_path_of_a_shape_mismatch():
    saved = {"model": {"layers": [torch.zeros(2, 3), torch.zeros(4, 5)]}, "step": 3}
    live = {"model": {"layers": [torch.zeros(2, 3), torch.zeros(5, 4)]}, "step": 0}
    flat = flatten(saved)
    with pytest.raises(CheckpointError, match=re.escape("state['model']['layers'][1]") + r".*\(5, 4\).*\(4, 5\)"):
        check_compatible(live, flat.skeleton, flat.tensors)


def test_check_compatible_looks_inside_stateful_objects():
    flat = flatten({"net": torch.nn.Linear(3, 4)})
    with pytest.raises(CheckpointError, match=re.escape("state['net'].state_dict()['weight']") + ".*shape"):
        check_compatible({"net": torch.nn.Linear(4, 3)}, flat.skeleton, flat.tensors)


def test_check_compatible_accepts_same_shapes_and_other_dtypes():
    flat = flatten({"w": torch.zeros(2, 2), "net": torch.nn.Linear(2, 2), "extra": {"x": 1}})
    live = {"w": torch.ones(2, 2, dtype=torch.float64), "net": torch.nn.Linear(2, 2), "extra": {"x": 0}}
    plan = check_compatible(live, flat.skeleton, flat.tensors)  # no exception
    assert plan.result(1) == RestoreResult(1, (), (), ())
    assert torch.equal(live["w"], torch.ones(2, 2, dtype=torch.float64))  # and nothing was touched


def test_check_compatible_lists_missing_and_unexpected_keys():
    flat = flatten({"w": torch.zeros(2), "extra": {"x": 1}})
    live = {"w": torch.ones(2), "new": 5}
    with pytest.raises(StateMismatchError, match=re.escape("missing from the checkpoint (1): state['new']")) as info:
        check_compatible(live, flat.skeleton, flat.tensors, where="step 3")
    assert str(info.value).startswith("step 3 does not fit the live state; nothing was changed")
    assert info.value.unexpected_keys == ("state['extra']",)
    plan = check_compatible(live, flat.skeleton, flat.tensors, strict=False)
    assert plan.result(3) == RestoreResult(3, ("state['new']",), ("state['extra']",), ())
    assert torch.equal(live["w"], torch.ones(2))


def test_check_compatible_refuses_to_replace_live_tensors_objects_and_dicts():
    flat = flatten({"xs": [torch.ones(2)] * 3, "obj": Counter(1), "d": None, "t": 5})
    live = {"xs": [torch.zeros(2)] * 2, "obj": {"count": 0}, "d": {"a": 1}, "t": torch.zeros(1)}
    with pytest.raises(StateMismatchError) as info:
        check_compatible(live, flat.skeleton, flat.tensors, strict=False)
    message = str(info.value)
    assert "state['xs']: the live state holds a list of 2, the checkpoint a list of 3" in message
    assert "state['obj']: the live state holds a dict, the checkpoint the state of a Counter" in message
    assert "state['d']: the live state holds a dict, the checkpoint the value 'None'" in message
    assert "state['t']: the live state holds a tensor, the checkpoint the value '5'" in message


def test_check_compatible_lets_values_and_empty_lists_be_replaced():
    flat = flatten({"xs": [torch.ones(2)] * 3, "v": torch.ones(1), "hist": [1, 2]})
    live = {"xs": [], "v": None, "hist": [0]}
    plan = check_compatible(live, flat.skeleton, flat.tensors)
    restore_into(live, flat.skeleton, flat.tensors, plan)
    assert len(live["xs"]) == 3 and torch.equal(live["v"], torch.ones(1)) and live["hist"] == [1, 2]


# ---- restore_into -------------------------------------------------------------------------------


def test_restore_into_updates_in_place_and_replaces_scalars():
    saved = {
        "step": 7,
        "lr": 0.05,
        "name": "run-b",
        "extra": {"epoch": 3, "added": [1]},
        "hist": [5, 6],
        "pair": (torch.full((2,), 9.0), "tag"),
        "w": torch.arange(3, dtype=torch.float32),
        "counter": Counter(11),
        "maybe": None,
    }
    flat, skeleton, tensors, _ = roundtrip(saved)
    w = torch.zeros(3, dtype=torch.float64)
    extra = {"epoch": 1, "only_live": "kept"}
    hist = [0, 0]
    counter = Counter(0)
    live = {
        "step": 0,
        "lr": 0.1,
        "name": "run-a",
        "extra": extra,
        "hist": hist,
        "pair": (torch.zeros(2), "old"),
        "w": w,
        "counter": counter,
        "maybe": 42,
    }
    with pytest.raises(StateMismatchError):  # without a plan, a strict one: 'extra' differs
        restore_into(live, skeleton, tensors)
    assert extra == {"epoch": 1, "only_live": "kept"} and live["step"] == 0
    plan = check_compatible(live, skeleton, tensors, strict=False)
    result = restore_into(live, skeleton, tensors, plan)
    assert result is live
    assert live["step"] == 7 and live["lr"] == 0.05 and live["name"] == "run-b" and live["maybe"] is None
    assert live["extra"] is extra and extra == {"epoch": 3, "only_live": "kept", "added": [1]}  # inserted
    assert live["hist"] is hist and hist == [5, 6]
    assert isinstance(live["pair"], tuple) and live["pair"][1] == "tag"
    assert torch.equal(live["pair"][0], torch.full((2,), 9.0))
    assert live["w"] is w and w.dtype == torch.float64 and w.tolist() == [0.0, 1.0, 2.0]
    assert live["counter"] is counter and counter.count == 11 and counter.history == [11]
    # the live tensor owns its data: later changes to the loaded tensors do not leak into it
    for t in tensors:
        t.zero_()
    assert w.tolist() == [0.0, 1.0, 2.0]


def test_restore_into_loads_modules_and_optimizers_in_place():
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    _, skeleton, tensors, _ = roundtrip({"model": model, "opt": opt})

    live_model = torch.nn.Linear(3, 2)
    live_opt = torch.optim.SGD(live_model.parameters(), lr=0.01, momentum=0.9)
    weight = live_model.weight
    live = {"model": live_model, "opt": live_opt}
    restore_into(live, skeleton, tensors)
    assert live["model"] is live_model and live_model.weight is weight
    assert torch.equal(live_model.weight, model.weight) and torch.equal(live_model.bias, model.bias)
    assert live_opt.param_groups[0]["lr"] == 0.3
    assert torch.equal(live_opt.state[live_model.weight]["momentum_buffer"], opt.state[model.weight]["momentum_buffer"])


def test_restore_into_wraps_a_failing_load_state_dict():
    class Broken(Counter):
        def load_state_dict(self, state):
            raise KeyError("count")

    _, skeleton, tensors, _ = roundtrip({"obj": Counter(3)})
    with pytest.raises(CheckpointError, match=re.escape("state['obj']") + ".*Broken.load_state_dict"):
        with pytest.warns(UserWarning, match=re.escape("could not put state['obj'] back")):
            restore_into({"obj": Broken()}, skeleton, tensors)


def test_restore_into_list_of_different_length_is_replaced():
    _, skeleton, tensors, _ = roundtrip({"xs": [1, 2, 3]})
    live_list = [9]
    live = {"xs": live_list}
    restore_into(live, skeleton, tensors)
    assert live["xs"] == [1, 2, 3]


# ---- a manager's saves take the last skeleton's nodes again (NodeCache) -----------------------


def _containers(node: dict) -> list[dict]:
    """Every container node of a skeleton (dict, list, tuple and object nodes), depth first."""
    found = []
    kind = next(k for k in node if k in ("d", "l", "t", "o", "T", "N", "S", "G", "v", "dt", "dev"))
    if kind == "d":
        found.append(node)
        for _, child in node["d"]:
            found += _containers(child)
    elif kind in ("l", "t"):
        found.append(node)
        for child in node[kind]:
            found += _containers(child)
    elif kind == "o":
        found.append(node)
        found += _containers(node["o"])
    return found


def _trained_state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return {"model": model, "opt": opt, "step": 1, "extra": {"epoch": 0, "seen": [1, 2.0, None]}}


def test_an_unchanged_state_takes_every_container_of_the_last_skeleton_again():
    from asyncckpt.state.tree import NodeCache

    state, nodes = _trained_state(), NodeCache()
    first = flatten(state, nodes).skeleton
    second = flatten(state, nodes)
    assert second.skeleton is first
    assert second.skeleton == flatten(state).skeleton  # what a flatten without the cache makes
    assert flatten(state).skeleton is not first  # without it every node is new
    assert len(second.tensors) == len(flatten(state).tensors)


def test_a_changed_value_makes_new_nodes_on_its_path_only():
    from asyncckpt.state.tree import NodeCache

    state, nodes = _trained_state(), NodeCache()
    first = flatten(state, nodes).skeleton
    state["step"] = 2
    state["opt"].param_groups[0]["lr"] = 5e-4  # as a scheduler would
    second = flatten(state, nodes).skeleton
    assert second == flatten(state).skeleton
    assert json.loads(json.dumps(second)) == json.loads(json.dumps(flatten(state).skeleton))
    old, new = _containers(first), _containers(second)
    shared = [n for n in new if any(n is o for o in old)]
    assert second is not first and second["d"][0][1] is first["d"][0][1]  # the model's, untouched
    opt_old, opt_new = first["d"][1][1], second["d"][1][1]
    assert opt_new is not opt_old  # its param group's lr changed
    assert opt_new["o"]["d"][0][1] is opt_old["o"]["d"][0][1]  # its per-parameter state did not
    assert second["d"][3][1] is first["d"][3][1]  # "extra"
    assert len(shared) == len(new) - 5  # the root, the optimizer's object and state dict, its groups and group


@pytest.mark.parametrize(
    "values",
    [
        [1, True, 1.0, 1, False, 0, 0.0, -0.0, 0.0],
        [float("nan"), float("nan"), float("inf"), 1e308, "1", 1, None, 0, None],
        [np.float64(0.0), np.float64(-0.0), 0.0, np.float64(-0.0), -0.0, np.float64(0.0)],
    ],
    ids=["numbers that compare equal", "nan, inf, str and None", "numpy float64 zeros"],
)
def test_values_equal_in_python_but_not_the_same_are_never_taken_for_each_other(values):
    """1, 1.0 and True are equal in Python, and so are 0.0 and -0.0 (numpy's float64, a float,
    too): each save must still store the value it was given, with its type and sign."""
    from asyncckpt.state.tree import NodeCache

    nodes = NodeCache()
    for value in values:
        state = {"v": value, "nested": {"v": [value]}}
        skeleton = json.loads(json.dumps(flatten(state, nodes).skeleton))
        for got in (skeleton["d"][0][1]["v"], skeleton["d"][1][1]["d"][0][1]["l"][0]["v"]):
            if isinstance(value, float):  # numpy's float64 comes back a float, as without the cache
                assert type(got) is float, (value, got)
                assert got.hex() == float(value).hex() or (math.isnan(got) and math.isnan(value)), (value, got)
            else:
                assert type(got) is type(value) and got == value, (value, got)


def test_containers_of_the_same_children_but_another_kind_or_key_type_are_not_taken():
    from asyncckpt.state.tree import NodeCache

    nodes = NodeCache()
    for state, want in (
        ({"x": [1, 2]}, "l"),
        ({"x": (1, 2)}, "t"),
        ({"x": {1: 0}}, 1),
        ({"x": {"1": 0}}, "1"),
    ):
        node = flatten(state, nodes).skeleton["d"][0][1]
        assert node == flatten(state).skeleton["d"][0][1]
        if isinstance(want, str) and len(node) == 1 and want in node:
            continue
        assert node["d"][0][0] == want and type(node["d"][0][0]) is type(want), node


def test_equal_subtrees_of_one_save_serialise_as_without_the_cache():
    from asyncckpt.state.tree import NodeCache

    nodes = NodeCache()
    state = {"a": {"lr": 0.1, "n": [1, 2]}, "b": {"lr": 0.1, "n": [1, 2]}, "c": [{"x": 1}, {"x": 1}]}
    for _ in range(2):
        skeleton = flatten(state, nodes).skeleton
        assert json.dumps(skeleton) == json.dumps(flatten(state).skeleton)
    assert skeleton["d"][0][1] is skeleton["d"][1][1]  # one node for both: never changed, so shared


def test_a_rank_s_flatten_takes_the_last_nodes_and_its_global_leaves_follow_the_state():
    from asyncckpt.state.shards import RankInfo, flatten_rank
    from asyncckpt.state.tree import NodeCache

    me, nodes = RankInfo(0, 2), NodeCache()
    state = {"shared": {"w": torch.ones(4, 2), "b": torch.zeros(2)}, "mine": {"x": torch.ones(3)}, "step": 1}
    first = flatten_rank(state, me, replicated=("shared",), nodes=nodes)
    second = flatten_rank(state, me, replicated=("shared",), nodes=nodes)
    assert second.skeleton is first.skeleton
    swapped = {"shared": {"b": torch.zeros(2), "w": torch.ones(4, 2)}, "mine": {"x": torch.ones(3)}, "step": 1}
    third = flatten_rank(swapped, me, replicated=("shared",), nodes=nodes)
    assert json.dumps(third.skeleton) == json.dumps(flatten_rank(swapped, me, replicated=("shared",)).skeleton)
    assert third.skeleton["d"][1][1] is first.skeleton["d"][1][1]  # "mine": the same leaves
    assert third.skeleton["d"][0][1] is not first.skeleton["d"][0][1]


def test_module_metadata_that_changes_makes_a_new_node(monkeypatch):
    from asyncckpt.state.tree import NodeCache

    model, nodes = torch.nn.Linear(2, 2), NodeCache()
    first = flatten({"m": model}, nodes).skeleton
    monkeypatch.setattr(torch.nn.Linear, "_version", 2)  # a module class that changed its state dict's layout
    second = flatten({"m": model}, nodes).skeleton
    assert second is not first and second["d"][0][1]["o"]["d"] == first["d"][0][1]["o"]["d"]
    assert second["d"][0][1]["o"]["m"][""]["version"] == 2


def test_a_flatten_that_raises_leaves_the_last_nodes_for_the_next():
    from asyncckpt.state.tree import NodeCache

    state, nodes = _trained_state(), NodeCache()
    first = flatten(state, nodes).skeleton
    with pytest.raises(TypeError, match="cannot checkpoint"):
        flatten({**state, "bad": object()}, nodes)
    assert flatten(state, nodes).skeleton is first
