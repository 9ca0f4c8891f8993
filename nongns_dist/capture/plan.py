"""Which parameter is measured in which norm, and which rank owns each matrix.

A plan is built once per ``attach`` from the model's parameters AFTER wrapping, keyed by cleaned
fully-qualified names: DDP, FSDP and ``torch.compile`` insert prefixes and FSDP replaces the
parameter objects, so names are the one key every backend can map its own tensors to.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from nongns_dist.estimators import check_dense_real, combined_norm
from nongns_dist.norms import Norm, norm_named
from nongns_dist.optim.geometry import group_norms

__all__ = [
    "MeasurementPlan",
    "PlanEntry",
    "TrackedParam",
    "check_measurable_module",
    "clean_fqn",
    "group_kinds",
    "module_plan_entries",
    "plan_entries",
    "sparse_gradient_parameters",
]

#: Prefixes wrappers put into ``named_parameters`` names (FSDP1, activation checkpointing,
#: ``torch.compile``), removed wherever they occur. (DDP's ``module.`` is not one: its backend
#: names the wrapped module's parameters.)
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")

#: (cleaned name, shape of the full unsharded parameter, norm or None for "not measured")
PlanEntry = tuple[str, torch.Size, Norm | None]


def clean_fqn(name: str) -> str:
    """``module._fsdp_wrapped_module.layers.0._orig_mod.weight`` -> ``layers.0.weight``."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


@dataclass(frozen=True)
class TrackedParam:
    """A parameter that enters the estimate."""

    index: int  # row in the partial-sum table
    name: str  # cleaned fully-qualified name
    norm: Norm  # from the registry (``nongns_dist.norms.NORMS``)
    shape: torch.Size  # of the full (unsharded) parameter
    owner: int | None = None  # nuclear only: the rank that reduces and finishes its Gram

    @property
    def gram_size(self) -> int:
        """Rows of the matrix view of ``norms.as_matrix``: min(out, in * kernel)."""
        return min(self.shape[0], self.shape.numel() // self.shape[0])

    @property
    def triangle_size(self) -> int:
        m = self.gram_size
        return m * (m + 1) // 2


class MeasurementPlan:
    """The measured parameters, their norms, and matrix owners; the same on every rank.

    Owners balance the eigen/Newton-Schulz work (m^3) across the ``world_size`` ranks of the
    data-parallel group, greedily from the largest, ties broken by parameter order.
    """

    def __init__(self, entries: Sequence[PlanEntry], world_size: int, rank: int) -> None:
        self.world_size = world_size
        self.rank = rank
        measured = [(name, torch.Size(shape), k) for name, shape, k in entries if k is not None]
        if not measured:
            raise ValueError("no trainable parameter is left in the estimate")
        self.norm = combined_norm([k for _, _, k in measured])  # raises on l2 + dual mixes
        load = [0.0] * world_size
        owners: dict[int, int] = {}
        work = [TrackedParam(0, n, k, s).gram_size ** 3 if k.matrix else 0 for n, s, k in measured]
        for i in sorted((i for i, w in enumerate(work) if w), key=lambda i: (-work[i], i)):
            owner = min(range(world_size), key=lambda r: (load[r], r))
            owners[i] = owner
            load[owner] += work[i]
        self.params = [
            TrackedParam(i, name, kind, shape, owners.get(i))
            for i, (name, shape, kind) in enumerate(measured)
        ]
        self.by_name = {t.name: t for t in self.params}
        self.matrices = [t for t in self.params if t.norm.matrix]

    def get(self, name: str) -> TrackedParam | None:
        """The tracked parameter of a (raw or cleaned) name, or None if it is not measured."""
        return self.by_name.get(clean_fqn(name))

    def tracked(
        self, named_parameters: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[torch.Tensor, TrackedParam]]:
        """(parameter object, its plan entry) of every measured one among ``named_parameters``:
        how a backend maps the tensors its hooks see to the plan."""
        for name, param in named_parameters:
            tracked = self.get(name)
            if tracked is not None:
                yield param, tracked

    def owned(self) -> list[TrackedParam]:
        return [t for t in self.matrices if t.owner == self.rank]


def group_kinds(optimizer: torch.optim.Optimizer, norm: str) -> dict[int, str | None]:
    """Norm per parameter ``id`` of the optimizer's groups, before any shape filter
    (``auto``: the group's geometry; explicit: that norm for every parameter)."""
    if norm != "auto":
        return {id(p): norm for g in optimizer.param_groups for p in g["params"]}
    return {
        id(p): kind
        for group, kind in zip(optimizer.param_groups, group_norms(optimizer), strict=True)
        for p in group["params"]
    }


def sparse_gradient_parameters(module: torch.nn.Module) -> list[str]:
    """Cleaned names of the trainable parameters whose gradients are sparse: the weights of
    ``nn.Embedding`` / ``nn.EmbeddingBag`` built with ``sparse=True`` (DDP's own rule,
    ``DistributedDataParallel._build_params_for_reducer``)."""
    return [
        clean_fqn(f"{prefix}.{name}" if prefix else name)
        for prefix, sub in module.named_modules()
        if isinstance(sub, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and sub.sparse
        for name, p in sub.named_parameters(recurse=False)
        if p.requires_grad
    ]


def check_measurable_module(module: torch.nn.Module) -> None:
    """Refuse a module the noise scale cannot be measured on, before anything is hooked: no
    parameter at all, none that requires grad, or a trainable one with a sparse gradient.

    Sparse gradients: DDP all-reduces each one on its own (a bucket of its own, the sparse
    tensor passed to the comm hook as it is, gloo/NCCL sparse all-reduce), FSDP and ZeRO take
    none; the measurement needs per-coordinate squares and Grams of dense gradients, which a
    sparse one (rows touched by this rank only) does not give without densifying the whole
    table. So it is refused: build the embedding with ``sparse=False``, or freeze it."""
    name = type(module).__name__
    params = list(module.parameters())
    if not params:
        raise ValueError(
            f"the model ({name}) has no parameters: there is no gradient to measure; allowed: "
            "a model with at least one parameter that requires grad"
        )
    if not any(p.requires_grad for p in params):
        raise ValueError(
            f"none of the {len(params)} parameters of the model ({name}) requires grad: there "
            "is no gradient to measure; allowed: a model with at least one parameter that "
            "requires grad"
        )
    sparse = sparse_gradient_parameters(module)
    if sparse:
        raise ValueError(
            f"parameter(s) {sparse} get sparse gradients (nn.Embedding / nn.EmbeddingBag with "
            "sparse=True), which the noise scale cannot be measured on: DDP all-reduces a "
            "sparse gradient in a bucket of its own, FSDP and ZeRO take none, and the "
            "statistics need dense gradients; allowed: sparse=False, or freeze the parameter "
            "(requires_grad=False)"
        )
    for pname, p in module.named_parameters():
        if p.requires_grad:
            check_dense_real(f"parameter {clean_fqn(pname)!r}", p)


def module_plan_entries(
    module: torch.nn.Module, norm: str, optimizer: torch.optim.Optimizer | None
) -> list[PlanEntry]:
    """``plan_entries`` of a module whose parameters are the optimizer's own objects (DDP's
    wrapped module, an FSDP2 root, a plain module): ``auto`` reads the optimizer's groups.
    The module is checked first (``check_measurable_module``)."""
    check_measurable_module(module)
    kinds = group_kinds(optimizer, norm) if optimizer is not None else None
    return plan_entries(module.named_parameters(), norm, kinds)


def plan_entries(
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    norm: str,
    kinds: Mapping[int, str | None] | None = None,
    *,
    shape_of: Mapping[int, torch.Size] | None = None,
) -> list[PlanEntry]:
    """Entries for the trainable parameters.

    ``norm``: the config's (``l1``, ``l2``, ``nuclear``, ``auto``). ``kinds`` (by ``id``,
    from ``group_kinds``) is required for ``auto``. ``shape_of`` (by ``id``) gives the full
    shape where a parameter object is a shard, a flat view or a placeholder (ZeRO-3, FSDP).
    Nuclear covers parameters whose full shape has >= 2 dims; the rest are left out. Empty
    parameters (0 elements, e.g. shape (0, 5)) are left out under every norm, as in
    ``estimate_gns``: they add zero to every sum and have no matrix for a Gram. Complex or
    sparse parameters are refused (``ValueError``): only real dense gradients are measured.
    """
    named = [(n, p) for n, p in named_parameters if p.requires_grad]
    for name, p in named:
        check_dense_real(f"parameter {clean_fqn(name)!r}", p)
    if norm == "auto" and kinds is None:
        raise ValueError("norm='auto' needs the optimizer; pass optimizer= or pick a norm")
    chosen = None if norm == "auto" else norm_named(norm, also=["auto"])
    entries: list[PlanEntry] = []
    for name, p in named:
        shape = torch.Size((shape_of or {}).get(id(p), p.shape))
        given = chosen if chosen is not None else (kinds or {}).get(id(p))
        kind = None if given is None else norm_named(given)
        if kind is not None and not kind.covers(shape):  # the spectral estimate: matrices
            kind = None
        if shape.numel() == 0:  # nothing to measure: zero in every sum, no Gram
            kind = None
        entries.append((clean_fqn(name), shape, kind))
    if chosen is not None and chosen.matrix and not any(k is not None for _, _, k in entries):
        raise ValueError(
            f"norm={chosen.name!r} needs at least one trainable, non-empty parameter with >= "
            f"{chosen.min_dims} dims"
        )
    if not any(k is not None for _, _, k in entries):
        raise ValueError(
            f"norm={norm!r} leaves no trainable parameter to measure (empty ones, with 0 "
            "elements, are left out)"
        )
    return entries
