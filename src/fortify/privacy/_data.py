"""What the privacy audits share: input checks, batched predictions, the box (exact row matching
lives in ``fortify.data.rows``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fortify.attacks.base import check_positive_int
from fortify.data.base import Split
from fortify.data.rows import input_groups, matching_rows, shared_rows
from fortify.errors import DataError
from fortify.models.modes import evaluation_mode
from fortify.threat import ThreatModel


def check_split(split: Split, name: str) -> None:
    """Raise DataError unless ``split`` is a non-empty finite batch with integer labels.

    Any floating dtype passes: predictions cast inputs to the model's dtype (``to_model``).
    """
    if not isinstance(split, Split):
        raise DataError(f"{name} must be a fortify.data.Split (inputs and labels), got "
                        f"{type(split).__name__}")
    x, y = split.x, split.y
    if x.dim() < 2 or x.shape[0] == 0:
        raise DataError(f"{name}: expected a non-empty batch of shape (N, ...), got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise DataError(f"{name}: inputs must be floating point, got dtype {x.dtype}")
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise DataError(f"{name}: inputs contain {bad} NaN/Inf values")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise DataError(f"{name}: labels must be integer class indices, got dtype {y.dtype}")


def check_member_sets(members: Split, non_members: Split) -> None:
    """Both sets valid, of one input shape, and without an input that appears in both."""
    check_split(members, "members")
    check_split(non_members, "non-members")
    if members.x.shape[1:] != non_members.x.shape[1:]:
        raise DataError(f"members have inputs of shape {tuple(members.x.shape[1:])} but non-members "
                        f"{tuple(non_members.x.shape[1:])}")
    shared = shared_rows(members.x, non_members.x)
    if shared.numel():
        member_index, nonmember_index = shared[0].tolist()
        raise DataError(
            f"{shared.shape[0]} input(s) appear among both members and non-members (e.g. member "
            f"{member_index} equals non-member {nonmember_index}); an example cannot be both: "
            "remove the duplicates from one of the sets"
        )


def pool_groups(pool: Split, name: str) -> Tensor:
    """``input_groups`` of a pool whose halves models train on; fewer than 2 distinct inputs refused.

    Halves are drawn over distinct inputs, so copies of a single input leave one half empty however
    many rows they fill.
    """
    groups = input_groups(pool.x)
    distinct = int(groups.max()) + 1
    if distinct < 2:
        raise DataError(f"the {name} needs at least 2 distinct inputs to split in halves, got {distinct} "
                        f"(in {len(pool)} rows)")
    return groups


def locate(pool: Split, query: Split, *, by_input: bool = False) -> Tensor:
    """For each query example, the index of an identical (input, label) in ``pool`` (with
    ``by_input``, of an identical input under any label), or -1."""
    labels = (None, None) if by_input else (query.y, pool.y)
    pairs = matching_rows(query.x, pool.x, *labels)
    index = torch.full((len(query),), -1, dtype=torch.long)
    index[pairs[:, 0]] = pairs[:, 1]
    return index


def join(members: Split, non_members: Split) -> tuple[Split, Tensor]:
    """Members then non-members as one split, with a boolean membership label per example."""
    candidates = Split(torch.cat([members.x, non_members.x]), torch.cat([members.y, non_members.y]))
    is_member = torch.cat([torch.ones(len(members), dtype=torch.bool),
                           torch.zeros(len(non_members), dtype=torch.bool)])
    return candidates, is_member


def model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def model_dtype(model: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype of the model's floating-point parameters, ``default`` for a model without any."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), default)


def to_model(model: nn.Module, x: Tensor) -> Tensor:
    """``x`` on the model's device and in the dtype of its floating-point parameters.

    Data from numpy arrives as float64 while models are mostly float32. The model computes in its
    own dtype in any case, so the cast is what a caller would do by hand; it moves an input by at
    most 6e-8 of its size, far below what any data set measures.
    """
    return x.to(device=model_device(model), dtype=model_dtype(model, x.dtype))


def logit_confidence(logits: Tensor, y: Tensor) -> Tensor:
    """``phi = log(p_y / (1 - p_y))``, computed as ``z_y - logsumexp_{i != y} z_i`` to stay exact."""
    z, y = logits.double(), y.long()  # int32 or uint8 labels: gather and scatter take int64
    true = z.gather(1, y.unsqueeze(1)).squeeze(1)
    others = z.scatter(1, y.unsqueeze(1), -math.inf).logsumexp(dim=1)
    return true - others


def predict_logits(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """Logits for ``x`` (cast by ``to_model``) in eval mode, batched, on the model's device."""
    check_positive_int("batch_size", batch_size)
    with evaluation_mode(model), torch.inference_mode():
        return torch.cat([model(to_model(model, x[i:i + batch_size])) for i in range(0, len(x), batch_size)])


def check_labels_fit(logits: Tensor, y: Tensor, name: str) -> None:
    classes = logits.shape[1]
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise DataError(f"{name}: labels range over [{int(y.min())}, {int(y.max())}] but the model "
                        f"has {classes} outputs (allowed: 0..{classes - 1})")


def check_model_takes_labels(model: nn.Module, x: Tensor, y: Tensor, name: str) -> None:
    """``check_labels_fit`` against ``model``'s outputs, counted on one forward pass of ``x[:1]``:
    for attacks that never see the logits of every example. Soft label rows are left alone."""
    if y.dim() == 1 and y.numel():
        check_labels_fit(predict_logits(model, x[:1]), y, name)


def project_to_box(x: Tensor, bounds: tuple[float, float]) -> Tensor:
    """The nearest point of the box, computed by the ThreatModel like every other clip.

    The L-inf ball of radius (hi - lo) around the box centre contains the whole box, so projecting
    onto ball-and-box is exactly the box clip.
    """
    lo, hi = float(bounds[0]), float(bounds[1])
    box = ThreatModel("linf", hi - lo, (lo, hi))
    return box.project(x, torch.full_like(x, 0.5 * (lo + hi)))
