"""Deterministic multi-rank training fixtures (FSDP2, HSDP, DDP) for use inside a ``_dist`` rank function.

The model is one small MLP (``Net``) whose shapes exercise resharding's corner cases. FSDP2 shards
every parameter on dim 0 in ``ceil(rows / shards)`` chunks, so with the default ``DIMS``:

    param              shape     2 shards      4 shards
    layers.0.weight    (33, 8)   17, 16        9, 9, 9, 6        uneven
    layers.0.bias      (33,)     17, 16        9, 9, 9, 6        uneven, 1-D
    layers.1.weight    (17, 33)  9, 8          5, 5, 5, 2        uneven
    layers.2.weight    (3, 17)   2, 1          1, 1, 1, 0        an empty shard at 4
    layers.3.weight    (1, 3)    1, 0          1, 0, 0, 0        empty shards at 2 and 4
    layers.3.bias      (1,)      1, 0          1, 0, 0, 0
    out_scale          (1,)      a buffer: never sharded, a plain tensor in every state dict

Same seed, same start: each ``make_*`` seeds torch, builds the full model on every rank and only then
wraps it (``fully_shard`` keeps each rank's slice of the full tensor; DDP broadcasts rank 0's), so
the initial FULL weights are identical under DDP, FSDP2 and HSDP and at world sizes 1, 2 and 4
(tests/test_dist_harness.py checks it).

Same data: step ``s`` has one global batch of ``GLOBAL_BATCH`` rows drawn from ``seed(s)``; rank ``r``
of ``w`` trains on rows ``[r*B/w, (r+1)*B/w)``. Every rank sees different data, and the averaged
gradient is the global batch's at any world size, so runs at different world sizes follow the same
trajectory up to float rounding. At world size 2, DDP and FSDP2 agree BIT-EXACTLY after training
(a two-term sum is order-free and /2 is exact); at 4, DDP's all-reduce, FSDP2's reduce-scatter and
HSDP's reduce-scatter + all-reduce add the four gradients in different orders, so they (and 2 vs 4
ranks) agree to float rounding only: about 3e-8 in the params after 2 steps (the slow test checks it).

``full_state(model, optim)`` flattens the full (unsharded) params, buffers and AdamW state into one
``{key: plain tensor}`` dict, identical on every rank, keyed without DDP's ``module.`` prefix:
``param.<name>``, ``buffer.<name>``, ``exp_avg.<name>``, ``exp_avg_sq.<name>``, ``step.<name>``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

DIMS = (8, 33, 17, 3, 1)
GLOBAL_BATCH = 8
LR = 1e-2


class Net(nn.Module):
    """Linear layers (``layers.<i>``) with tanh between them, times a persistent buffer ``out_scale``."""

    def __init__(self, dims: tuple[int, ...] = DIMS) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims[:-1], dims[1:], strict=True))
        self.register_buffer("out_scale", torch.full((dims[-1],), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x * self.out_scale


def _build(seed: int, dims: tuple[int, ...]) -> Net:
    torch.manual_seed(seed)
    return Net(dims)


def _adamw(model: nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)


def make_fsdp2(seed: int, dims: tuple[int, ...] = DIMS, mesh=None) -> tuple[nn.Module, torch.optim.AdamW]:
    """FSDP2 (``fully_shard`` per layer, then the root) over the default group, or over ``mesh``."""
    from torch.distributed.fsdp import fully_shard

    model = _build(seed, dims)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, _adamw(model)


def make_hsdp(seed: int, dims: tuple[int, ...] = DIMS) -> tuple[nn.Module, torch.optim.AdamW]:
    """HSDP for world size 4: a ("replicate", "shard") = (2, 2) mesh; params are placed
    ``(Replicate(), Shard(0))``: ranks 0,1 hold one copy of the two shards, ranks 2,3 the other."""
    from torch.distributed.device_mesh import init_device_mesh

    assert dist.get_world_size() == 4, "make_hsdp is for world size 4"
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    return make_fsdp2(seed, dims, mesh=mesh)


def make_ddp(seed: int, dims: tuple[int, ...] = DIMS) -> tuple[nn.Module, torch.optim.AdamW]:
    """``DistributedDataParallel`` (CPU, gloo) over the same ``Net``; ``model.module`` is the Net."""
    model = nn.parallel.DistributedDataParallel(_build(seed, dims))
    return model, _adamw(model)


def batch(step: int, rank: int, world_size: int, dims: tuple[int, ...] = DIMS) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s slice of step ``step``'s global batch (inputs, targets); see the module doc."""
    g = torch.Generator().manual_seed(1_000_003 * (step + 1))
    x = torch.randn(GLOBAL_BATCH, dims[0], generator=g)
    y = torch.randn(GLOBAL_BATCH, dims[-1], generator=g)
    per = GLOBAL_BATCH // world_size
    assert per * world_size == GLOBAL_BATCH, f"world size {world_size} must divide {GLOBAL_BATCH}"
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def train_steps(model: nn.Module, optim: torch.optim.Optimizer, start: int, n: int, rank: int) -> list[float]:
    """Steps ``start .. start+n-1``; returns each step's global mean loss (the same on every rank)."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    dims = _dims(model)
    losses = []
    for step in range(start, start + n):
        x, y = batch(step, rank, world_size, dims)
        loss = nn.functional.mse_loss(model(x), y)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        mean = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(mean)
            mean /= world_size
        losses.append(mean.item())
    return losses


def _net(model: nn.Module) -> Net:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _dims(model: nn.Module) -> tuple[int, ...]:
    layers = _net(model).layers
    return (layers[0].in_features, *(layer.out_features for layer in layers))


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def full_state(model: nn.Module, optim: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Full params, buffers and AdamW state as plain tensors, the same on every rank (a collective:
    every rank must call it). Keys: see the module doc."""
    net = _net(model)
    out: dict[str, torch.Tensor] = {}
    for name, p in net.named_parameters():
        out[f"param.{name}"] = _full(p)
        for key, value in optim.state.get(p, {}).items():
            out[f"{key}.{name}"] = _full(value)
    for name, b in net.named_buffers():
        out[f"buffer.{name}"] = _full(b)
    return out


def state_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = True) -> list[str]:
    """The keys where ``a`` and ``b`` differ (missing, shape, dtype, or value: bit-exact when ``exact``,
    else ``torch.allclose``), each with the largest difference; empty when they agree."""
    bad = [f"{k}: only in the first" for k in a.keys() - b.keys()]
    bad += [f"{k}: only in the second" for k in b.keys() - a.keys()]
    for k in sorted(a.keys() & b.keys()):
        x, y = a[k], b[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            bad.append(f"{k}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}")
        elif not (torch.equal(x, y) if exact else torch.allclose(x, y)):
            bad.append(f"{k}: max |diff| {(x.double() - y.double()).abs().max().item():.3g}")
    return bad
