"""Feature search: a greedy attack over whole-feature moves, for categories and whole numbers.

Gradient attacks move a one-hot group or an integer only when a step crosses half a category or half
a grid step, which small steps rarely do. This attack searches the discrete moves directly. Each
round it tries, for every example still standing, every single-feature move from its current point:

- a categorical feature switched to each other category;
- an integer or binary feature one step up and one step down, and to each end of its allowed range;
- a continuous feature to each end of its allowed range;

projects every candidate onto the threat model (so each is feasible, and under an l2 budget the
projection decides which earlier changes still fit), scores all of them with one batched forward
pass, and keeps the move that raises the margin ``max_{k != y} z_k - z_y`` most. It stops for an
example once the model is fooled, no move helps, or ``max_changes`` rounds have passed. The result
is deterministic: the seed is not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fortify.attacks.base import ATTACKS, Attack, check_positive_int
from fortify.errors import ConfigError
from fortify.tabular.constraints import CATEGORY, CONTINUOUS, ConstrainedThreatModel
from fortify.threat import ThreatModel

# Rows per forward pass when scoring candidates (bounds memory for wide tables)
_CHUNK = 16384


@dataclass(frozen=True)
class _Moves:
    """Numeric moves as (column, kind of value, sign) and category moves as (start, stop, category)."""

    column: Tensor  # (M_num,)
    from_clean: Tensor  # (M_num,) bool: x_j + sign * reach (True) or current_j + sign * step (False)
    sign: Tensor  # (M_num,)
    categories: tuple[tuple[int, int, int], ...]


class FeatureSearch(Attack):
    name = "feature-search"

    def __init__(self, threat: ThreatModel, *, max_changes: int = 8, targeted: bool = False,
                 seed: int = 0) -> None:
        if not isinstance(threat, ConstrainedThreatModel):
            raise ConfigError("attack 'feature-search' needs a tabular threat model: give the data a "
                              "schema (--schema, or a csv dataset)")
        super().__init__(threat, targeted=targeted, seed=seed)
        self.max_changes = check_positive_int("max_changes", max_changes)
        self._moves_cache: dict[str, _Moves] = {}

    @property
    def label(self) -> str:
        return f"{self.name}-{self.max_changes}"

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "max_changes": self.max_changes}

    def with_threat(self, threat: ThreatModel) -> FeatureSearch:
        clone = super().with_threat(threat)
        assert isinstance(clone, FeatureSearch)
        clone._moves_cache = {}
        return clone

    # -- search --------------------------------------------------------------------------------

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None,
                generator: torch.Generator) -> Tensor:
        current = x.clone()
        with torch.no_grad():
            score = self.margin(model(current), y, target)
        standing = score <= 0
        for _ in range(self.max_changes):
            rows = standing.nonzero().squeeze(1)
            if rows.numel() == 0:
                break
            best, point = self._best_moves(model, current, x, y, target, rows)
            better = best > score[rows]
            moved = rows[better]
            current[moved] = point[better]
            score[moved] = best[better]
            standing[rows] = better & (best <= 0)
        return current

    def _best_moves(self, model: nn.Module, current: Tensor, x: Tensor, y: Tensor, target: Tensor | None,
                    rows: Tensor) -> tuple[Tensor, Tensor]:
        """Per row of ``rows``, the score and the point of its best single-feature move. Blocks of
        rows keep the candidates held at once near ``_CHUNK`` rows of the table: a wide one-hot
        table has thousands of moves per row, and all rows' candidates at once grew as rows x moves x
        columns."""
        moves = self._moves(x.device)
        block = max(1, _CHUNK // (moves.column.numel() + len(moves.categories)))
        bests, points = [], []
        for part in rows.split(block):
            candidates = self.candidates(current[part], x[part])  # (n, M, d)
            wanted = None if target is None else target[part]
            scores = self._score(model, candidates, x[part], y[part], wanted)
            best, choice = scores.max(dim=1)
            bests.append(best)
            points.append(candidates[torch.arange(len(part), device=x.device), choice])
        return torch.cat(bests), torch.cat(points)

    def margin(self, logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
        """Positive exactly when the attack succeeded (prediction != y, or == target)."""
        if self.targeted:
            assert target is not None
            wanted = logits.gather(1, target[:, None]).squeeze(1)
            return wanted - logits.scatter(1, target[:, None], -torch.inf).amax(dim=1)
        true = logits.gather(1, y[:, None]).squeeze(1)
        return logits.scatter(1, y[:, None], -torch.inf).amax(dim=1) - true

    def _score(self, model: nn.Module, candidates: Tensor, x: Tensor, y: Tensor,
               target: Tensor | None) -> Tensor:
        n, m, d = candidates.shape
        flat = candidates.reshape(n * m, d)
        clean = x.repeat_interleave(m, dim=0)
        labels = y.repeat_interleave(m)
        wanted = None if target is None else target.repeat_interleave(m)
        parts = []
        with torch.no_grad():
            for start in range(0, n * m, _CHUNK):
                part = slice(start, start + _CHUNK)
                logits = model(flat[part])
                parts.append(self.margin(logits, labels[part], None if wanted is None else wanted[part]))
        # in the logits' dtype, which the clean scores they are compared with have too
        scores = torch.cat(parts)
        # projection makes every candidate feasible; the check guards that promise
        scores[~self.threat.contains(flat, clean)] = -torch.inf
        return scores.reshape(n, m)

    # -- candidate moves -------------------------------------------------------------------------

    def candidates(self, current: Tensor, x: Tensor) -> Tensor:
        """Every single-feature move from ``current``, projected: (n, M, d)."""
        moves = self._moves(x.device)
        lay = self.threat.layout(x.device)  # type: ignore[attr-defined]
        n_num = moves.column.numel()
        total = n_num + len(moves.categories)
        out = current[:, None, :].repeat(1, total, 1)
        if n_num:
            cols = moves.column
            reach = 2 * self.threat.eps / lay.cost[cols]  # beyond the cap: the projection clips it back
            from_clean = x[:, cols].double() + moves.sign * reach
            stepped = current[:, cols].double() + moves.sign / lay.steps[cols]
            values = torch.where(moves.from_clean, from_clean, stepped)
            out[:, torch.arange(n_num, device=x.device), cols] = values.to(out.dtype)
        for offset, (start, stop, category) in enumerate(moves.categories):
            block = torch.zeros(stop - start, dtype=out.dtype, device=x.device)
            block[category] = 1
            out[:, n_num + offset, start:stop] = block
        flat = out.reshape(-1, x.shape[1])
        projected = self.threat.project(flat, x.repeat_interleave(total, dim=0))
        return projected.reshape(out.shape)

    def _moves(self, device: torch.device) -> _Moves:
        key = str(device)
        if key not in self._moves_cache:
            self._moves_cache[key] = self._build_moves(device)
        return self._moves_cache[key]

    def _build_moves(self, device: torch.device) -> _Moves:
        lay = self.threat.layout(device)  # type: ignore[attr-defined]
        column, from_clean, sign = [], [], []
        for j in range(lay.kind.numel()):
            if lay.kind[j] == CATEGORY or not lay.mutable[j]:
                continue
            allowed = [s for s in (1, -1) if int(lay.direction[j]) in (0, s)]
            for s in allowed:
                column.append(j), from_clean.append(True), sign.append(s)
                if lay.kind[j] != CONTINUOUS:
                    column.append(j), from_clean.append(False), sign.append(s)
        categories = tuple((start, stop, k) for start, stop, mutable in lay.groups if mutable
                           for k in range(stop - start))
        return _Moves(torch.tensor(column, dtype=torch.long, device=device),
                      torch.tensor(from_clean, dtype=torch.bool, device=device),
                      torch.tensor(sign, dtype=torch.float64, device=device), categories)


ATTACKS.add("feature-search", FeatureSearch)
