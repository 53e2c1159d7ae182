"""Square Attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020): score-based random search.

The attack sees only the logits. It starts from a perturbation on the surface of the ball (vertical
stripes of +-eps for L-inf, a 5x5 tiling of pseudo-Gaussian blocks for L2) and then, once per query,
proposes a change inside one random square window and keeps it when the margin loss
``z_y - max_{j != y} z_j`` drops. The window side follows the paper's schedule: ``p`` (the share of
pixels a window covers) starts at ``p_init`` and halves at fixed iterations, laid out for 10,000
queries and by default rescaled to ``n_queries``, as AutoAttack's ``SquareAttack`` does by default.
AutoAttack's standard ensemble turns the rescaling off (``resc_schedule=False``): the windows then
shrink at the same queries whatever the budget, and a budget short of 10,000 ends before the smallest
of them. ``rescale_schedule=False`` gives that schedule; fortify's ``autoattack`` preset keeps the
rescaled one, which fooled one more digit in six of eight reduced-budget runs (docs/ATTACKS.md).

Differences from the reference code, all in the direction of the paper's text: every example draws
its own window position (the reference shares one per batch), the position ranges over all
``h - s + 1`` places, and an L-inf proposal that would leave the window unchanged is replaced by
another vertex at no query cost (the authors' original NumPy code redraws it).

Queries: one per example for the clean input, one for the starting point, one per iteration; an
example leaves the search once it is fooled. ``last_queries`` holds the per-example count of the
latest call and never exceeds ``n_queries``. AutoAttack's ``n_queries`` counts the proposals alone,
so at the same number it spends up to two more model calls per example (its start and its clean
check) and runs two more proposals. A targeted call also runs the model once on one example
beforehand, to check the target labels against its classes (as every fortify attack does).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fortify.attacks.base import ATTACKS, Attack, check_positive_int
from fortify.errors import ConfigError, DataError
from fortify.models.predictions import at_least_fp32
from fortify.threat import ThreatModel

# (last rescaled iteration, divisor of p_init): the piecewise-halving schedule of the paper's code
_P_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
               (8000, 256))
_P_FINAL_DIVISOR = 512
_SCHEDULE_LENGTH = 10_000  # the schedule was tuned for 10,000 queries and is rescaled to n_queries


class Square(Attack):
    """Square Attack under an L-inf or L2 threat model, untargeted or targeted, margin loss."""

    name = "square"

    def __init__(
        self,
        threat: ThreatModel,
        *,
        n_queries: int = 5000,
        p_init: float = 0.8,
        rescale_schedule: bool = True,
        targeted: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(threat, targeted=targeted, seed=seed)
        self.n_queries = check_positive_int("n_queries", n_queries)
        if isinstance(p_init, bool) or not (isinstance(p_init, (int, float)) and 0 < p_init <= 1):
            raise ConfigError(f"p_init must be a number in (0, 1], got {p_init!r}")
        self.p_init = float(p_init)
        if not isinstance(rescale_schedule, bool):
            raise ConfigError(f"rescale_schedule must be true or false, got {rescale_schedule!r}")
        self.rescale_schedule = rescale_schedule
        self.last_queries: Tensor | None = None

    @property
    def label(self) -> str:
        return f"{self.name}-{self.n_queries}"

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "n_queries": self.n_queries, "p_init": self.p_init,
                "rescale_schedule": self.rescale_schedule}

    # -- the search ---------------------------------------------------------------------------

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None,
                generator: torch.Generator) -> Tensor:
        images = _as_images(x)
        oracle = _Oracle(self, model, x.shape, y, target)
        self.last_queries = oracle.queries
        everyone = torch.arange(x.shape[0], device=x.device)
        with torch.no_grad():
            best = images.clone()
            margin, done = oracle.ask(images, everyone)
            if self.n_queries >= 2:
                self._start(oracle, images, best, margin, done, generator)
            for iteration in range(self.n_queries - 2):
                active = (~done).nonzero().squeeze(1)
                if active.numel() == 0:
                    break
                candidate = self._propose(images[active], best[active], iteration, generator)
                new_margin, fooled = oracle.ask(candidate, active)
                better = fooled | (new_margin < margin[active])
                best[active[better]] = candidate[better]
                margin[active[better]] = new_margin[better]
                done[active[fooled]] = True
        return self.threat.project(best.reshape(x.shape), x)

    def _start(self, oracle: _Oracle, images: Tensor, best: Tensor, margin: Tensor, done: Tensor,
               generator: torch.Generator) -> None:
        """Move every not-yet-fooled example to the paper's starting point (in place)."""
        active = (~done).nonzero().squeeze(1)
        if active.numel() == 0:
            return
        if self.threat.norm == "linf":
            start = self._stripes(images[active], generator)
        else:
            start = self._tiles(images[active], generator)
        best[active] = start
        margin[active], done[active] = oracle.ask(start, active)

    def _propose(self, clean: Tensor, best: Tensor, iteration: int, generator: torch.Generator) -> Tensor:
        p = self._p(iteration)
        if self.threat.norm == "linf":
            return self._propose_linf(clean, best, p, generator)
        return self._propose_l2(clean, best, p, generator)

    def _p(self, iteration: int) -> float:
        """Share of the pixels one window covers at this iteration (the paper's halving schedule)."""
        if self.rescale_schedule:
            iteration = int(iteration / self.n_queries * _SCHEDULE_LENGTH)
        for last, divisor in _P_SCHEDULE:
            if iteration <= last:
                return self.p_init / divisor
        return self.p_init / _P_FINAL_DIVISOR

    # -- L-inf --------------------------------------------------------------------------------

    def _stripes(self, clean: Tensor, generator: torch.Generator) -> Tensor:
        """Vertical stripes: one random +-eps per (example, channel, column)."""
        n, c, _, w = clean.shape
        signs = _random_signs((n, c, 1, w), clean, generator)
        return self.threat.project(clean + self.threat.eps * self._as_change(signs, clean), clean)

    def _propose_linf(self, clean: Tensor, best: Tensor, p: float, generator: torch.Generator) -> Tensor:
        """Set one random window to a random vertex of the ball (one sign per channel).

        A vertex equal to the window's current values would waste a query; those examples get
        another vertex instead (at least one channel's sign flipped), as the original code redraws.
        """
        n, c, h, w = clean.shape
        side = max(round(math.sqrt(p * h * w)), 1)
        window = _windows(n, _window_shape(side, h, w), h, w, clean.device, generator).mask
        signs = _random_signs((n, c, 1, 1), clean, generator)
        candidate = self._vertex_in_window(clean, best, signs, window)
        unchanged = ~((candidate != best) & window).flatten(1).any(dim=1)
        if unchanged.any():
            flip = _nonempty_subsets(n, c, clean.device, generator) & unchanged[:, None]
            signs = torch.where(flip[:, :, None, None], -signs, signs)
            candidate = self._vertex_in_window(clean, best, signs, window)
        return candidate

    def _vertex_in_window(self, clean: Tensor, best: Tensor, signs: Tensor, window: Tensor) -> Tensor:
        # the box clip keeps a vertex distinct from its flip: clip(x + eps) > clip(x - eps) for x in the box
        vertex = clean + self.threat.eps * self._as_change(signs, clean)
        return torch.where(window, self.threat.project(vertex, clean), best)

    # -- the threat's budget --------------------------------------------------------------------
    # The search builds its perturbations in budget units: a coordinate's change times what it spends
    # of eps (``ThreatModel.coordinate_costs``: 1 everywhere in a plain ball). Under a feature schema
    # (fortify.tabular) a cheap feature may then move eps / cost, and an immutable one not at all,
    # instead of every coordinate eps, which the projection would have clipped to a fraction of the set.

    def _as_change(self, budget: Tensor, clean: Tensor) -> Tensor:
        """A perturbation in budget units as a change of the input."""
        costs = self.threat.coordinate_costs(clean)
        if costs is None:
            return budget
        return torch.where(costs > 0, budget / costs.clamp_min(_division_guard(costs.dtype)), 0.0)

    def _as_budget(self, change: Tensor, clean: Tensor) -> Tensor:
        """A change of the input in budget units (0 where a coordinate may not move)."""
        costs = self.threat.coordinate_costs(clean)
        return change if costs is None else change * costs

    def _movable(self, budget: Tensor, clean: Tensor) -> Tensor:
        """``budget`` with its coordinates that may not move set to 0, before it is scaled to eps."""
        costs = self.threat.coordinate_costs(clean)
        return budget if costs is None else torch.where(costs > 0, budget, 0.0)

    # -- L2 -----------------------------------------------------------------------------------

    def _tiles(self, clean: Tensor, generator: torch.Generator) -> Tensor:
        """A centred 5x5 tiling of pseudo-Gaussian blocks with random signs, scaled to norm eps."""
        # in float32 at least: in float16 the squared norms of a [0, 255] box pass 65504 and turn
        # to inf, and inf - inf made the proposals NaN (the projection casts back to x's dtype)
        x, clean = clean, at_least_fp32(clean)
        n, c, h, w = clean.shape
        rows, cols = _TileAxis(h, clean.device), _TileAxis(w, clean.device)
        block_h, block_w = rows.block, cols.block
        upright = _pseudo_gaussian(block_h, block_w, split_rows=block_h >= block_w, like=clean)
        pattern = upright[rows.offset][:, cols.offset].expand(n, 1, h, w)
        if block_h == block_w:
            flipped = _pseudo_gaussian(block_h, block_w, split_rows=False, like=clean)
            flip = torch.rand((n, 1, rows.count, cols.count), generator=generator,
                              device=clean.device) < 0.5
            per_pixel_flip = flip[:, :, rows.tile][:, :, :, cols.tile]
            pattern = torch.where(per_pixel_flip, flipped[rows.offset][:, cols.offset], pattern)
        signs = _random_signs((n, c, rows.count, cols.count), clean, generator)
        valid = rows.valid[:, None] & cols.valid[None, :]
        delta = self._movable(pattern * signs[:, :, rows.tile][:, :, :, cols.tile] * valid, clean)
        return self.threat.project(clean + self.threat.eps * self._as_change(_unit_l2(delta), clean), x)

    def _propose_l2(self, clean: Tensor, best: Tensor, p: float, generator: torch.Generator) -> Tensor:
        """Move mass from a second window into a first one (Algorithm 3 of the paper), per channel.

        The first window gets the old window direction plus a fresh pseudo-Gaussian bump with a
        random sign, rescaled so that it takes the budget of both windows and whatever is left
        of eps; the second window is zeroed. The whole perturbation is then put back on the sphere.
        """
        x, clean, best = clean, at_least_fp32(clean), at_least_fp32(best)  # as in _tiles
        n, c, h, w = clean.shape
        side = max(round(math.sqrt(p * h * w)), 3)
        side += 1 - side % 2  # an odd side keeps the bump centred
        shape = _window_shape(side, h, w)
        first = _windows(n, shape, h, w, clean.device, generator)
        second = _windows(n, shape, h, w, clean.device, generator)
        delta = self._as_budget(best - clean, clean)
        spare = (self.threat.eps ** 2 - _sq_norm(delta, (1, 2, 3))).clamp_min(0) / c
        both = _sq_norm(delta * (first.mask | second.mask), (2, 3))
        old = delta * first.mask
        bump = self._placed_bump(first, shape, clean, generator) * _random_signs((n, c, 1, 1), clean,
                                                                                  generator)
        guard = _division_guard(old.dtype)
        fresh = bump + old / (_sq_norm(old, (2, 3)).sqrt() + guard)
        fresh = fresh / (_sq_norm(fresh, (2, 3)).sqrt() + guard) * (spare + both).sqrt()
        delta = self._movable(torch.where(first.mask, fresh, delta * ~second.mask), clean)
        return self.threat.project(clean + self.threat.eps * self._as_change(_unit_l2(delta), clean), x)

    def _placed_bump(self, window: _Windows, shape: tuple[int, int], like: Tensor,
                     generator: torch.Generator) -> Tensor:
        """The pseudo-Gaussian pattern placed in each example's window, randomly transposed."""
        rows, cols = shape
        upright = _pseudo_gaussian(rows, cols, split_rows=rows >= cols, like=like)
        placed = window.place(upright)
        if rows == cols:
            flip = torch.rand((like.shape[0], 1, 1, 1), generator=generator, device=like.device) < 0.5
            placed = torch.where(flip, window.place(upright.T.contiguous()), placed)
        return placed


ATTACKS.add("square", Square)


# -- helpers ------------------------------------------------------------------------------------

class _Oracle:
    """The model as the attack may see it: margins and success, one query per example per call."""

    def __init__(self, attack: Square, model: nn.Module, shape: torch.Size, y: Tensor,
                 target: Tensor | None) -> None:
        self.attack, self.model, self.shape = attack, model, shape
        self.y, self.target = y, target
        self.queries = torch.zeros(shape[0], dtype=torch.long, device=y.device)

    def ask(self, images: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Margin (lower is better for the attacker) and success for the examples ``idx``."""
        logits = self.model(images.reshape(-1, *self.shape[1:]))
        self.queries[idx] += 1
        y = self.y[idx]
        target = None if self.target is None else self.target[idx]
        labels = target if self.attack.targeted and target is not None else y
        return _margin(logits, labels, self.attack.targeted), self.attack.succeeded(logits, y, target)


class _Windows:
    """One rectangular window per example: its mask and a way to paste a pattern into it."""

    def __init__(self, top: Tensor, left: Tensor, shape: tuple[int, int], h: int, w: int) -> None:
        self.shape = shape
        rows = torch.arange(h, device=top.device)
        cols = torch.arange(w, device=top.device)
        self.row_offset = rows[None, :] - top[:, None]  # (n, h)
        self.col_offset = cols[None, :] - left[:, None]  # (n, w)
        in_rows = (self.row_offset >= 0) & (self.row_offset < shape[0])
        in_cols = (self.col_offset >= 0) & (self.col_offset < shape[1])
        self.mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (n, 1, h, w)

    def place(self, pattern: Tensor) -> Tensor:
        r = self.row_offset.clamp(0, self.shape[0] - 1)
        c = self.col_offset.clamp(0, self.shape[1] - 1)
        return pattern[r[:, :, None], c[:, None, :]][:, None] * self.mask


def _windows(n: int, shape: tuple[int, int], h: int, w: int, device: torch.device,
             generator: torch.Generator) -> _Windows:
    top = torch.randint(0, h - shape[0] + 1, (n,), generator=generator, device=device)
    left = torch.randint(0, w - shape[1] + 1, (n,), generator=generator, device=device)
    return _Windows(top, left, shape, h, w)


def _window_shape(side: int, h: int, w: int) -> tuple[int, int]:
    """A side x side square, or a strip of the same area when the input is only h < side rows high."""
    rows = min(side, h)
    return rows, min(max(round(side * side / rows), 1), w)


class _TileAxis:
    """Along one axis: which tile each pixel falls in, its offset inside the tile, and validity."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.block = max(size // 5, 1)
        start = max((size - 5 * self.block) // 2, 0)
        self.count = (size - start) // self.block
        local = torch.arange(size, device=device) - start
        self.valid = (local >= 0) & (local < self.count * self.block)
        self.tile = (local // self.block).clamp(0, self.count - 1)
        self.offset = local.remainder(self.block)


def _pseudo_gaussian(rows: int, cols: int, *, split_rows: bool, like: Tensor) -> Tensor:
    """The paper's window pattern: two halves of opposite sign, each a stack of concentric
    rectangles weighted 1/(k+1)^2, with unit L2 norm. ``split_rows`` halves it along the rows."""
    if not split_rows:
        return _pseudo_gaussian(cols, rows, split_rows=True, like=like).T.contiguous()
    top, bottom = rows // 2, rows - rows // 2
    pattern = torch.cat([_rectangles(top, cols, like), -_rectangles(bottom, cols, like)])
    return pattern / pattern.norm().clamp_min(_division_guard(pattern.dtype))


def _rectangles(rows: int, cols: int, like: Tensor) -> Tensor:
    """Concentric rectangles around the centre: pixel (i, j) at Chebyshev ring r gets
    sum_{k >= r} 1/(k+1)^2, normalised to unit L2 norm."""
    if rows == 0:
        return torch.zeros(0, cols, dtype=like.dtype, device=like.device)
    rings = max(rows // 2 + 1, cols // 2 + 1)
    weights = 1.0 / torch.arange(1, rings + 1, dtype=like.dtype, device=like.device) ** 2
    tail = weights.flip(0).cumsum(0).flip(0)
    i = (torch.arange(rows, device=like.device) - rows // 2).abs()
    j = (torch.arange(cols, device=like.device) - cols // 2).abs()
    pattern = tail[torch.maximum(i[:, None], j[None, :])]
    return pattern / pattern.norm()


def _margin(logits: Tensor, labels: Tensor, targeted: bool) -> Tensor:
    """``z_y - max_{j != y} z_j`` (untargeted) or ``max_{j != t} z_j - z_t`` (targeted)."""
    own = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], -torch.inf).amax(dim=1)
    return (others - own) if targeted else (own - others)


def _nonempty_subsets(n: int, c: int, device: torch.device, generator: torch.Generator) -> Tensor:
    """Per example a random non-empty subset of the c channels, as a (n, c) boolean mask."""
    subset = torch.rand((n, c), generator=generator, device=device) < 0.5
    forced = torch.randint(0, c, (n,), generator=generator, device=device)
    empty = ~subset.any(dim=1)
    subset[empty, forced[empty]] = True
    return subset


def _random_signs(shape: tuple[int, ...], like: Tensor, generator: torch.Generator) -> Tensor:
    bits = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return (2 * bits - 1).to(like.dtype)


def _sq_norm(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    return (t * t).sum(dim=dims, keepdim=True)


def _unit_l2(delta: Tensor) -> Tensor:
    return delta / (_sq_norm(delta, (1, 2, 3)).sqrt() + _division_guard(delta.dtype))


def _division_guard(dtype: torch.dtype) -> float:
    """1e-12 keeps a zero norm from dividing 0 by 0; in float16 it would round to 0 itself."""
    return max(1e-12, torch.finfo(dtype).tiny)


def _as_images(x: Tensor) -> Tensor:
    """View a batch as (N, C, H, W): features (N, D) become one row, sequences (N, C, L) too."""
    if x.dim() == 4:
        return x
    if x.dim() == 2:
        return x.reshape(x.shape[0], 1, 1, x.shape[1])
    if x.dim() == 3:
        return x.reshape(x.shape[0], x.shape[1], 1, x.shape[2])
    raise DataError(f"square attacks batches of shape (N, C, H, W), (N, C, L) or (N, D); "
                    f"got {tuple(x.shape)}")
