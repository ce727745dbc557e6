"""What one rank of a multi-rank job stores: its own state, and its share of the job's tensors.

A training state on many ranks holds three kinds of tensor:

* **DTensors** (FSDP2 parameters and their optimizer state, HSDP, tensor parallel): each rank holds
  a box of the global tensor. The box is stored as a *piece* with its global offsets; where several
  ranks hold the same box (a ``Replicate`` mesh dimension), one of them writes it, chosen by the
  tensor's index so the replicas share the writing.
* **Replicated tensors**: the parameters, buffers and optimizer state of a DDP-wrapped model (the
  same on every rank, by construction), the plain tensors of a module or optimizer whose parameters
  are DTensors (buffers, AdamW's ``step``), and whatever the user declares replicated. Each is cut
  into row pieces spread evenly over the ranks (see :func:`assign_rows`): every rank copies to host
  and writes only its own rows, and the busiest rank writes at most one row more than its share.
* Everything else (``RNGState``, a sampler's position, plain values) is **per rank**: each rank
  stores its own, never merged.

The plan is computed by every rank from its own state, with no collective: the global tensors'
order, shapes and placements are the same on every rank of a job that trains one model, and
:attr:`RankFlatState.fingerprint` lets one tiny collective confirm it before anything is written.
"""

from __future__ import annotations

import functools
import math
import warnings
import zlib
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch

from asyncckpt.format import GlobalEntry, PieceEntry, dtype_name
from asyncckpt.state.names import unwrap_module, wrapped_modules
from asyncckpt.state.skeleton import Kind, child_path, object_path
from asyncckpt.state.tree import (
    MAX_DEPTH,
    PLAIN_VALUES,
    FlatState,
    NodeCache,
    _Flattener,
    check_dense,
    is_stateful,
    storage_address,
    tie_key,
)


@dataclass(frozen=True)
class RankInfo:
    """Who this process is in the job."""

    rank: int
    world_size: int


@dataclass
class RankFlatState(FlatState):
    """``FlatState`` of one rank: the skeleton (global tensors as ``G`` leaves), the tensors this
    rank stages and writes (its per-rank tensors and its pieces), and the global tensor table.

    Attributes:
        globals: Every global tensor of the job, by index (the same list on every rank).
        pieces: This rank's pieces; ``PieceEntry.tensor`` indexes ``tensors``.
        rows_parts: By piece, in how many parts its global tensor's rows are split over the job
            (the mesh dimensions placed ``Shard(0)``; the world size for a replicated tensor's row
            pieces): what the chunks are cut for (``engine.chunking.piece_cuts``).
        live: The live tensor behind each global index (a DTensor, or a replicated plain tensor).
        optimizer_entries: The parameter behind each optimizer state entry's path, by position
            and by name (a restore's target for state the live optimizer has not created yet).
        fingerprint: A checksum of the global table and its placements, equal on every rank of a
            job whose ranks save the same model.
    """

    globals: list[GlobalEntry] = field(default_factory=list)
    pieces: list[PieceEntry] = field(default_factory=list)
    live: list[torch.Tensor] = field(default_factory=list)
    global_paths: list[str] = field(default_factory=list)
    optimizer_entries: dict[str, torch.Tensor] = field(default_factory=dict)
    fingerprint: int = 0
    rows_parts: list[int] = field(default_factory=list)


@functools.cache
def dtensor_type() -> type | None:
    """DTensor's class, looked up once: the flattener asks of every node of every save. The first
    call imports ``torch.distributed.tensor`` (about 0.8 s on a 2-core machine, sympy included):
    a multi-rank manager calls it when it opens, so that no save's stall includes it."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return None
    return DTensor


def is_dtensor(obj: Any) -> bool:
    """Whether ``obj`` is a DTensor."""
    cls = dtensor_type()
    return cls is not None and isinstance(obj, cls)


def dtensor_box(t: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (global offsets, shape) of this rank's local part of a DTensor.

    Raises:
        TypeError: A placement that is neither ``Shard`` nor ``Replicate`` (a ``Partial`` tensor
            holds no value of its own until it is reduced).
    """
    return _placed(tuple(t.shape), t.device_mesh, tuple(t.placements))[:2]


@functools.lru_cache(maxsize=1 << 14)
def _placed(shape: tuple[int, ...], mesh: Any, placements: tuple) -> tuple[Any, Any, int, int, int]:
    """:func:`dtensor_box` of a global shape on a mesh, plus this rank's index among the ranks
    holding the same box and how many hold it (the mesh dimensions it is replicated over), and
    in how many parts dimension 0 is sharded (the mesh dimensions placed ``Shard(0)``).
    Computed once: every save asks again for the same parameters, and the answer only depends on
    these."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for placement in placements:
        if type(placement) not in (Shard, Replicate):
            raise TypeError(f"a DTensor placed as {placement} cannot be checkpointed (only Shard and Replicate)")
    local, offsets = compute_local_shape_and_global_offset(shape, mesh, placements)
    coordinate = mesh.get_coordinate()
    index, count, rows_parts = 0, 1, 1
    for dim, placement in enumerate(placements):
        if isinstance(placement, Replicate):
            index = index * mesh.size(dim) + coordinate[dim]
            count *= mesh.size(dim)
        elif placement.dim == 0:
            rows_parts *= mesh.size(dim)
    return tuple(int(o) for o in offsets), tuple(int(s) for s in local), index, count, rows_parts


# DTensorSpec -> what a save asks of it; keyed by (id, hash): the entry holds the spec, so its id
# is not reused while the entry lives, and a spec changed in place hashes anew (torch recomputes
# a spec's hash when its mesh, placements or tensor meta are set).
_SPEC_FACTS: dict[tuple[int, int], tuple[Any, tuple]] = {}


def _spec_facts(t: Any) -> tuple[tuple[int, ...], tuple[int, ...], int, int, int, str, tuple, GlobalEntry]:
    """A DTensor's box (global offsets, local shape), its replica index and count and the parts
    its rows are sharded in (as :func:`_placed`), its placement as the fingerprint spells it,
    what tells its global tensor apart (global shape, placement, mesh: plain values, cheap to
    hash), and its global table entry. Cached per spec: each save asks again of every parameter
    and optimizer state, whose specs (their mesh, placements, global shape and dtype, all in the
    spec's hash) do not change between saves.

    Raises:
        TypeError: A dtype the format cannot store, or a placement other than Shard and Replicate.
    """
    spec = t._spec
    key = (id(spec), hash(spec))
    hit = _SPEC_FACTS.get(key)
    if hit is not None and hit[0] is spec:
        return hit[1]
    mesh, placements, shape = t.device_mesh, tuple(t.placements), tuple(t.shape)
    placement = f"{mesh.shape}{t.placements}"
    entry = GlobalEntry(dtype_name(t.dtype), shape)
    facts = (*_placed(shape, mesh, placements), placement, (shape, placement, id(mesh)), entry)
    if len(_SPEC_FACTS) >= 1 << 14:
        _SPEC_FACTS.clear()
    _SPEC_FACTS[key] = (spec, facts)
    return facts


def _data_parallel_wrapped(module: torch.nn.Module) -> bool:
    """Whether a DDP or DataParallel wrapper is ``module`` or among the wrappers it is (a
    torch.compile'd DDP model)."""
    return any(
        isinstance(m, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel))
        for m in wrapped_modules(module)
    )


def _ddp_parameters(state: Any) -> set[int]:
    """The ids of the parameters of every DDP-wrapped module in the state's containers."""
    found: set[int] = set()
    stack, seen = [state], 0
    while stack and seen < 100_000:
        obj = stack.pop()
        seen += 1
        if isinstance(obj, torch.nn.Module) and _data_parallel_wrapped(obj):
            found.update(id(p) for p in unwrap_module(obj).parameters())
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
    return found


def _is_data_parallel(obj: Any, ddp_params: set[int]) -> bool:
    """A DDP wrapper, a module or optimizer with a DTensor parameter, or an optimizer of a DDP
    model's parameters: the plain tensors of its state are the same on every rank."""
    if isinstance(obj, torch.nn.Module):
        return _data_parallel_wrapped(obj) or any(is_dtensor(p) for p in obj.parameters())
    if isinstance(obj, torch.optim.Optimizer):
        params = [p for group in obj.param_groups for p in group["params"]]
        return bool(params) and all(is_dtensor(p) or id(p) in ddp_params for p in params)
    return False


def assign_rows(sizes: list[tuple[int, int]], world_size: int) -> list[list[tuple[int, int, int]]]:
    """Spread replicated tensors over the ranks in row pieces, evenly by bytes.

    The tensors are laid end to end; rank r takes the rows whose middle byte falls in the r-th of
    ``world_size`` equal parts. Every rank's load is then its share plus at most one row.

    Args:
        sizes: Each tensor's (rows, bytes per row); a 0-dim tensor is one row.
        world_size: The number of ranks.

    Returns:
        Per tensor, its pieces as (rank, first row, end row), in row order.
    """
    return [list(pieces) for pieces in _row_pieces(tuple((int(rows), int(row)) for rows, row in sizes), world_size)]


@functools.lru_cache(maxsize=16)
def _row_pieces(sizes: tuple[tuple[int, int], ...], world_size: int) -> tuple[tuple[tuple[int, int, int], ...], ...]:
    """:func:`assign_rows`, computed once per set of sizes: every save of a training state asks
    again with the same sizes (hundreds of bisection steps for a model of many tensors)."""
    total = sum(rows * row for rows, row in sizes)
    out: list[tuple[tuple[int, int, int], ...]] = []
    at = 0
    for rows, row in sizes:
        pieces: list[tuple[int, int, int]] = []

        def owner(i: int, at: int = at, row: int = row) -> int:
            return min(world_size - 1, (2 * (at + i * row) + row) * world_size // (2 * total)) if total else 0

        first = 0
        while first < rows:
            rank = owner(first)
            # the last row this rank takes: owners never decrease along the rows
            lo, hi = first, rows - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if owner(mid) == rank:
                    lo = mid
                else:
                    hi = mid - 1
            pieces.append((rank, first, lo + 1))
            first = lo + 1
        out.append(tuple(pieces))
        at += rows * row
    return tuple(out)


class _RankFlattener(_Flattener):
    """``flatten`` for one rank: DTensors and replicated tensors become ``G`` leaves."""

    _leaf_tensor_types: frozenset[type] = frozenset()  # a plain tensor may be replicated: ``node`` decides

    def __init__(self, me: RankInfo, replicated: Collection[str], state: Any, nodes: NodeCache | None = None) -> None:
        super().__init__(state, nodes)
        self.me = me
        self.declared = {child_path("state", key) for key in replicated}
        self.globals: list[GlobalEntry] = []
        self.live: list[torch.Tensor] = []
        self.pieces: list[PieceEntry] = []
        self.rows_parts: list[int] = []  # by piece: in how many parts its global tensor's rows are
        self.placements: list[str] = []
        self.global_paths: list[str] = []
        self.optimizer_entries: dict[str, torch.Tensor] = {}
        self.ddp_params: set[int] = set()
        self.replicated_depth = 0  # > 0 inside a data-parallel object or a declared key
        self._replicas: list[tuple[int, torch.Tensor]] = []  # (global index, tensor) to cut in rows
        self._rank0_whole: list[tuple[int, torch.Tensor]] = []  # (global index, buffer) rank 0 writes whole
        self._buffers: set[tuple[Any, ...]] = set()  # (storage, offset) of the data-parallel modules' buffers
        self._global_seen: dict[tuple, int] = {}

    def _global(self, t: torch.Tensor, path: str, key: tuple, entry: GlobalEntry | None, placement: str) -> int | None:
        """The global index of ``t`` (a tied tensor once, by ``key``), or None the first time it is
        seen. ``entry``: its global table entry (None: made here, from ``t``)."""
        index = self._global_seen.get(key)
        if index is not None:
            return index
        if entry is None:
            try:
                entry = GlobalEntry(dtype_name(t.dtype), tuple(t.shape))
            except TypeError as exc:
                raise TypeError(f"{path}: {exc}") from None
        index = len(self.globals)
        self._global_seen[key] = index
        self.globals.append(entry)
        self.live.append(t)
        self.placements.append(placement)
        self.global_paths.append(path)
        return None

    def node(self, obj: Any, path: str, depth: int) -> dict:
        if type(obj) in PLAIN_VALUES and depth <= MAX_DEPTH:  # most leaves of an optimizer's state
            return {Kind.VALUE: obj}
        if is_dtensor(obj):
            return {Kind.GLOBAL: self._dtensor(obj, path)}
        if isinstance(obj, torch.Tensor) and (self.replicated_depth or path in self.declared):
            key = (storage_address(obj, path), obj.storage_offset(), tuple(obj.shape), obj.stride(), obj.dtype)
            known = self._global(obj, path, key, None, "replicated")
            if known is not None:
                return {Kind.GLOBAL: known}
            index = len(self.globals) - 1
            if key[:2] in self._buffers:  # its storage and offset: a buffer's, seen through the state dict
                self._rank0_whole.append((index, obj.detach()))
            else:
                self._replicas.append((index, obj.detach()))
            return {Kind.GLOBAL: index}
        if depth == 0:
            self.ddp_params = _ddp_parameters(obj)
        entering = path in self.declared or (is_stateful(obj) and _is_data_parallel(obj, self.ddp_params))
        if entering:
            obj = unwrap_module(obj)
            self.replicated_depth += 1
            if isinstance(obj, torch.nn.Module):
                # buffers are the same on every rank only at a forward's start, where DDP (by
                # default) broadcasts rank 0's; BatchNorm's running stats then move with each rank's
                # own batch. Rank 0's are what training goes on with: it writes them whole, never
                # row pieces of several ranks' (a tensor no rank held)
                self._buffers.update(
                    (storage_address(b, path), b.storage_offset()) for b in obj.buffers() if b.device.type != "meta"
                )
        try:
            return super().node(obj, path, depth)
        finally:
            if entering:
                self.replicated_depth -= 1

    def optimizer_state(self, optimizer: torch.optim.Optimizer, path: str) -> Any:
        """The base class's, recording where each parameter's state entry is (by position, and
        by name where the state dict is keyed so) for a restore to find the parameter of an entry."""
        state_dict, names = self.named_state(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        prefix = child_path(object_path(path), "state")
        for i, param in enumerate(params):
            self.optimizer_entries[child_path(prefix, i)] = param
        for name, param in zip(names or (), params, strict=False):
            self.optimizer_entries[child_path(prefix, name)] = param
        return state_dict

    def _dtensor(self, t: Any, path: str) -> int:
        try:
            offsets, shape, replica, replicas, rows_parts, placement, spec_key, entry = _spec_facts(t)
        except TypeError as exc:
            raise TypeError(f"{path}: {exc}") from None
        local = t._local_tensor  # what to_local() returns, without its autograd node (add_keyed detaches)
        storage, offset, stride = local.untyped_storage(), local.storage_offset(), local.stride()
        # by its local tensor's memory, not id(t): a state dict holds a new DTensor (detach()) per
        # name, so tied parameters come as two objects over one shard; the storage object (not its
        # address, 0 for every empty shard) tells distinct empty shards apart
        key = (storage._cdata, offset, tuple(local.shape), stride, local.dtype, spec_key)
        known = self._global(t, path, key, entry, placement)
        if known is not None:
            return known
        index = len(self.globals) - 1
        if tuple(local.shape) != shape:
            raise TypeError(f"{path}: the DTensor's local tensor is {tuple(local.shape)}, its placements say {shape}")
        if math.prod(shape) and replica == index % replicas:  # the replicas take turns writing
            check_dense(local, path)
            staged = self.add_keyed(local, tie_key(local, storage_address(local, path), offset, stride), path)
            self.pieces.append(PieceEntry(index, staged, offsets))
            # a DTensor whose rows are not sharded is written whole by one rank: cut as DDP's
            # row pieces are, for FSDP2 at this world size and its multiples
            self.rows_parts.append(rows_parts if rows_parts > 1 else self.me.world_size)
        return index

    def finish(self) -> None:
        """Cut the replicated tensors into row pieces and keep this rank's."""
        sizes = []
        for _, t in self._replicas:
            rows = t.shape[0] if t.dim() else 1
            sizes.append((rows, t.nbytes // rows if rows else 0))
        for (index, t), pieces in zip(self._replicas, _row_pieces(tuple(sizes), self.me.world_size), strict=True):
            for rank, first, end in pieces:
                if rank != self.me.rank or end == first:
                    continue
                part = t[first:end] if t.dim() else t
                offsets = (first,) + (0,) * max(0, t.dim() - 1) if t.dim() else ()
                self.pieces.append(PieceEntry(index, self.add_tensor(part, self.global_paths[index]), offsets))
                self.rows_parts.append(self.me.world_size)  # spread over every rank by bytes
        for index, t in self._rank0_whole:
            if self.me.rank == 0 and t.numel():
                self.pieces.append(PieceEntry(index, self.add_tensor(t, self.global_paths[index]), (0,) * t.dim()))
                self.rows_parts.append(self.me.world_size)

    def fingerprint(self) -> int:
        """What every rank's save must agree on: each global tensor's path, dtype, shape and
        placement, in order. The ranks' pieces are matched by index: without the paths, two
        tensors of one shape listed in another order on one rank (a dict built from a set) would
        have had their rows mixed."""
        described = zip(self.global_paths, self.globals, self.placements, strict=True)
        text = repr([(path, g.dtype, g.shape, p) for path, g, p in described])
        return zlib.crc32(text.encode())


def flatten_rank(
    state: Any, me: RankInfo, replicated: Collection[str] = (), nodes: NodeCache | None = None
) -> RankFlatState:
    """Split one rank's state into its skeleton, the tensors it writes, and the global table.

    Args:
        state: The rank's state, as ``flatten`` takes it.
        me: This rank and the world size.
        replicated: Top-level keys of ``state`` whose tensors are the same on every rank (stored
            once, spread over the ranks) although nothing marks them so.
        nodes: As ``flatten``'s.

    Returns:
        The rank's flat state.

    Raises:
        TypeError, ValueError: As ``flatten``; also a DTensor of a placement other than Shard or
            Replicate.
    """
    flattener = _RankFlattener(me, replicated, state, nodes)
    missing = [key for key in replicated if not isinstance(state, dict) or key not in state]
    if missing:  # a typo would otherwise store the key's tensors once per rank, silently
        warnings.warn(
            f"asyncckpt: replicated= names {missing}, which the state does not hold at its top level "
            f"(its keys: {list(state)[:20] if isinstance(state, dict) else type(state).__name__})",
            stacklevel=4,
        )
    skeleton = flattener.node(state, "state", 0)
    flattener.finish()
    if nodes is not None:
        nodes.keep(flattener.taken)
    return RankFlatState(
        skeleton,
        flattener.tensors,
        flattener.paths,
        globals=flattener.globals,
        pieces=flattener.pieces,
        rows_parts=flattener.rows_parts,
        live=flattener.live,
        global_paths=flattener.global_paths,
        optimizer_entries=flattener.optimizer_entries,
        fingerprint=flattener.fingerprint(),
    )
