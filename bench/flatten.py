"""What naming an optimizer's parameters costs the training thread at each save.

A save flattens the state on the training thread (part of its stall), and an optimizer's state
is keyed by its parameters' names, found in the state's modules. This times ``flatten`` of a
model of many small parameters + a stepped AdamW three ways, taking turns save by save: with the
names as saves find them (the module walks kept between saves), with every walk done afresh
(``named_parameters()`` at each save, what keeping them avoids), and with no names at all (the
state keyed by position, as torch's ``state_dict()``). Each way takes its last flatten's skeleton
nodes again, as a manager's saves do. The median of --saves flattens per round, then the median
over --rounds rounds.

    python bench/flatten.py                       # 24 transformer layers, 288 parameters
    python bench/flatten.py --layers 4 --rounds 3 # quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from unittest import mock

import torch

from asyncckpt.state import names as names_module
from asyncckpt.state.tree import NodeCache, flatten


def make_state(layers: int, width: int) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.TransformerEncoderLayer(width, 4, 2 * width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 2, width)).square().mean().backward()
    opt.step()
    return {"model": model, "optimizer": opt, "step": 1}


def time_flatten(state: dict, nodes: NodeCache) -> float:
    """One flatten as a manager's save makes it: taking the last save's skeleton nodes again."""
    began = time.perf_counter()
    flatten(state, nodes)
    return time.perf_counter() - began


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--saves", type=int, default=30, help="flattens per way per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    state = make_state(args.layers, args.width)
    params = sum(1 for _ in state["model"].parameters())
    fresh = mock.patch.object(names_module, "_kept_walk", names_module._walk)  # walked at every save
    unnamed = mock.patch.object(names_module.ParameterNames, "of", lambda self, optimizer: None)
    ways = {"names, kept walks": None, "names, fresh walks": fresh, "no names (by position)": unnamed}
    results: dict[str, list[float]] = {way: [] for way in ways}
    nodes = {way: NodeCache() for way in ways}  # each way its own, as each manager has
    for _ in range(args.rounds):
        per_save: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(args.saves):  # the ways take turns save by save: a noisy machine hits all alike
            for way, patch in ways.items():
                if patch is None:
                    per_save[way].append(time_flatten(state, nodes[way]))
                else:
                    with patch:
                        per_save[way].append(time_flatten(state, nodes[way]))
        for way, times in per_save.items():
            results[way].append(statistics.median(times))
    base = statistics.median(results["no names (by position)"])
    print(f"flatten of {args.layers} layers ({params} parameters) + AdamW; {args.rounds} rounds x {args.saves} saves")
    print("| way | flatten ms | minus no names, ms |")
    print("|---|---|---|")
    summary = {}
    for way, values in results.items():
        median = statistics.median(values)
        summary[way] = median
        print(f"| {way} | {median * 1e3:.3f} | {(median - base) * 1e3:+.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "parameters": params, "median_s": summary, "rounds": results}, f, indent=1)


if __name__ == "__main__":
    main()
