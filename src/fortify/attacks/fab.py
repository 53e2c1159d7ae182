"""FAB (Croce & Hein 2020): the fast adaptive boundary attack, a minimum-norm attack.

F. Croce and M. Hein, "Minimally distorted adversarial examples with a fast adaptive boundary
attack", ICML 2020, Algorithm 1. At the current point ``x_k`` the classifier is linearised, and the
boundary between the true class ``c`` and the class ``s`` whose linearised boundary is closest
(``|f_s - f_c| / ||grad f_s - grad f_c||_q``, ``q`` the dual norm) gives a hyperplane ``pi_s``.
Both ``x_k`` and the original point ``x`` are projected onto ``pi_s`` intersected with the input box
(``d_k`` and ``d_x``, exact projections), and the attack takes the step biased towards ``x``::

    alpha   = min(||d_k|| / (||d_k|| + ||d_x||), alpha_max)
    x_{k+1} = P_box((1 - alpha) (x_k + eta d_k) + alpha (x + eta d_x))

A step that fools the model is recorded if it is the smallest so far and is then pulled back,
``x_{k+1} <- x + beta (x_{k+1} - x)``, so that the search goes on closer to ``x``. Restarts after
the first begin at a random point within ``min(best norm, eps) / 2`` of ``x`` (a uniform draw from
the eps-ball, clipped to the box, then shrunk towards ``x``); a final search walks the segment
between ``x`` and the best point by linear interpolation of the logits. AutoAttack's code starts
its restarts on the surface of the ball of radius ``eps / 2`` whatever norm was found before, so
with more than one restart the two draw other starting points; one restart starts at ``x`` in both.

``FABTargeted`` is FAB-T as in AutoAttack: the hyperplane is always the boundary with one target
class, and the targets are, in turn, the ``n_target_classes`` non-true classes with the highest
clean logits. Success still means any prediction other than the label.

``perturb`` returns per example the smallest adversarial point found when its norm is at most eps,
and ``x`` otherwise, so every point lies inside the threat model. ``minimal`` returns the smallest
point found and its norm (``inf`` where none was found, ``0`` where ``x`` itself is misclassified).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from fortify.attacks.base import (
    ATTACKS,
    Attack,
    attacking,
    check_label_range,
    check_positive_int,
    diagnose_failure,
    top_target_classes,
)
from fortify.errors import ConfigError
from fortify.models.predictions import fooled_beyond_rounding, predicted_class, rounding_margin
from fortify.threat import ThreatModel

# keeps the distance to a hyperplane finite when two classes have the same gradient (as AutoAttack)
_GRAD_FLOOR = 1e-12
# projections shorter than this count as this long in the step bias, so alpha stays defined
_STEP_FLOOR = 1e-8


def _flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


def _expand(per_example: Tensor, like: Tensor) -> Tensor:
    return per_example.reshape(-1, *([1] * (like.dim() - 1)))


def vector_norm(flat: Tensor, norm: str) -> Tensor:
    """Row-wise ``||.||_inf`` or ``||.||_2`` of a (N, D) tensor."""
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(p=2, dim=1)


def dual_norm(flat: Tensor, norm: str) -> Tensor:
    """Norm dual to ``norm`` along the last dimension: L1 for L-inf, L2 for L2."""
    return flat.abs().sum(dim=-1) if norm == "linf" else flat.norm(p=2, dim=-1)


def _saturation_level(weight: Tensor, cap: Tensor, need: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, the smallest ``mu >= 0`` with ``sum_i weight_i * min(mu, cap_i) >= need``.

    The left side is piecewise linear, nondecreasing and concave in ``mu`` with breakpoints at the
    caps; sorting them gives its value at every breakpoint by cumulative sums, the first breakpoint
    that reaches ``need`` brackets ``mu``, and on that piece ``mu`` solves a linear equation.
    Returns ``(mu, feasible)``; ``feasible`` is False where even ``mu = max cap`` falls short.
    """
    caps, order = cap.sort(dim=1)
    weights = weight.gather(1, order)
    cum_weight = weights.cumsum(dim=1)
    cum_capped = (weights * caps).cumsum(dim=1)
    total = cum_weight[:, -1:]
    reach = cum_capped + caps * (total - cum_weight)  # the left side at mu = each cap
    below = (reach < need[:, None]).sum(dim=1, keepdim=True)
    feasible = below.squeeze(1) < cap.shape[1]
    zero = torch.zeros_like(total)
    saturated = torch.cat((zero, cum_capped), dim=1).gather(1, below).squeeze(1)
    free_weight = (total - torch.cat((zero, cum_weight), dim=1).gather(1, below)).squeeze(1)
    tiny = torch.finfo(weight.dtype).tiny
    return (need - saturated) / free_weight.clamp_min(tiny), feasible


def project_onto_hyperplane_in_box(points: Tensor, normals: Tensor, offsets: Tensor,
                                   bounds: tuple[float, float], norm: str) -> Tensor:
    """Shortest ``delta`` per row with ``<normal, delta> = offset`` and ``point + delta`` in the box.

    ``points``, ``normals``: (N, D); ``offsets``: (N,). Exact for ``norm`` in {"linf", "l2"}: the
    projection FAB takes at every step (Croce & Hein 2020). Flip signs so that the offset is
    positive, and let ``m_i`` be the room coordinate ``i`` has towards raising ``<w, delta>`` (up to
    the box face in the direction of ``sign(w_i)``). The minimiser is then
    ``delta_i = sign(w_i) * min(lam, m_i)`` for L-inf and ``delta_i = sign(w_i) * |w_i| *
    min(mu, m_i / |w_i|)`` for L2 (the box-clipped multiple of ``w`` that the KKT conditions give),
    with the smallest level that meets the offset. Where the hyperplane misses the box, every
    coordinate goes all the way to its box face (``delta_i = sign(w_i) * m_i``): the box point
    whose ``<w, delta>`` comes closest to the offset, as AutoAttack's FAB projections return it. A
    row whose normal is too small to define a finite projection gets ``delta = 0``.
    """
    work = torch.promote_types(points.dtype, torch.float32)
    points, normals, offsets = points.to(work), normals.to(work), offsets.to(work)
    lo, hi = bounds
    flip = torch.where(offsets < 0, -1.0, 1.0).to(work)
    w = normals * flip[:, None]
    need = offsets * flip
    size = w.abs()
    room = torch.where(w > 0, hi - points, points - lo).clamp_min(0)
    if norm == "linf":
        weight, cap = size, room
    else:
        weight = size.square()
        cap = torch.where(size > 0, room / size.clamp_min(torch.finfo(work).tiny), 0.0)
    level, feasible = _saturation_level(weight, cap, need)
    # out of reach: no level is high enough, and every coordinate saturates at its cap
    level = torch.where(feasible, level, torch.inf)[:, None]
    magnitude = torch.minimum(level, cap)
    if norm == "l2":
        magnitude = magnitude * size
    delta = w.sign() * magnitude
    # a vanishing normal defines no usable hyperplane (its level overflows): leave such rows in place
    return torch.where(torch.isfinite(delta).all(dim=1, keepdim=True), delta, 0.0)


class FAB(Attack):
    """Untargeted FAB: the closest linearised boundary among all other classes at each step.

    FAB chooses its own hyperplanes, so a ``target`` passed to the call is not used.
    """

    name = "fab"
    keeps_feature_schema = False  # its projections onto linearised boundaries are in the plain norm

    def __init__(
        self,
        threat: ThreatModel,
        *,
        steps: int = 100,
        restarts: int = 1,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        search_steps: int = 3,
        seed: int = 0,
    ) -> None:
        super().__init__(threat, targeted=False, seed=seed)
        self.steps = check_positive_int("steps", steps)
        self.restarts = check_positive_int("restarts", restarts)
        if not 0.0 <= alpha_max <= 1.0:
            raise ConfigError(f"alpha_max must be in [0, 1], got {alpha_max!r}")
        if not (math.isfinite(eta) and eta >= 1.0):
            raise ConfigError(f"eta (the overshoot) must be a finite number >= 1, got {eta!r}")
        if not 0.0 < beta <= 1.0:
            raise ConfigError(f"beta (the backward step) must be in (0, 1], got {beta!r}")
        if (isinstance(search_steps, bool) or not isinstance(search_steps, numbers.Real)
                or not math.isfinite(search_steps) or int(search_steps) != search_steps or search_steps < 0):
            raise ConfigError(f"search_steps must be an integer >= 0, got {search_steps!r}")
        self.alpha_max, self.eta, self.beta = float(alpha_max), float(eta), float(beta)
        self.search_steps = int(search_steps)

    @property
    def label(self) -> str:
        suffix = f"x{self.restarts}" if self.restarts > 1 else ""
        return f"{self.name}-{self.steps}{suffix}"

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "steps": self.steps, "restarts": self.restarts,
                "alpha_max": self.alpha_max, "eta": self.eta, "beta": self.beta,
                "search_steps": self.search_steps}

    # -- public entry points ------------------------------------------------------------------

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None,
                generator: torch.Generator) -> Tensor:
        best, norms = self._search(model, x, y, generator, stop_at=self.threat.eps)
        return torch.where(_expand(norms <= self.threat.eps, x), best, x)

    def minimal(self, model: nn.Module, x: Tensor, y: Tensor, *,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Smallest adversarial point found per example and its norm, not limited to eps.

        Where nothing was found the point is ``x`` and the norm ``inf``; where ``x`` is already
        misclassified, ``x`` and ``0``. Norms are in the threat model's norm, at least float32.
        """
        self._check_batch(x, y, None)
        with attacking(model):
            try:
                best, norms = self._search(model, x.detach(), y, self.seeded(x, generator), stop_at=0.0)
            except (IndexError, RuntimeError) as err:  # name the caller's mistake, as ``run`` does
                diagnose_failure(model, x, y, err)
                raise
        return best.detach(), norms

    # -- the search ---------------------------------------------------------------------------

    def _search(self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator,
                stop_at: float) -> tuple[Tensor, Tensor]:
        """Best point and norm per example; an example leaves once its norm is <= ``stop_at``."""
        with torch.no_grad():
            clean_logits = model(x)
        check_label_range(y, clean_logits.shape[1])
        best = x.clone()
        norms = torch.where(predicted_class(clean_logits) != y, 0.0, torch.inf).to(
            torch.promote_types(x.dtype, torch.float32))
        passes = [(target, restart) for target in self._targets(clean_logits, y)
                  for restart in range(self.restarts)]
        for target, restart in passes:
            todo = (norms > stop_at).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            run_x, run_norms = self._run(model, x[todo], y[todo],
                                         None if target is None else target[todo],
                                         self._start(x[todo], norms[todo], restart, generator), stop_at)
            better = run_norms < norms[todo]
            best[todo[better]] = run_x[better]
            norms[todo[better]] = run_norms[better]
        self._final_search(model, x, y, best, norms)
        return best, norms

    def _targets(self, clean_logits: Tensor, y: Tensor) -> list[Tensor | None]:
        """The target classes of each pass over the batch; ``[None]`` means the closest class."""
        return [None]

    def _start(self, x: Tensor, norms: Tensor, restart: int, generator: torch.Generator) -> Tensor:
        if restart == 0:
            return x.clone()
        # a draw from the eps-ball shrunk towards x, to radius min(best norm, eps) / 2 as in the paper;
        # a convex combination of x and a point of the box stays in the box and inside the ball
        draw = self.threat.random_start(x, generator)
        shrink = (norms.clamp(max=self.threat.eps) / (2 * self.threat.eps)).to(x.dtype)
        return x + _expand(shrink, x) * (draw - x)

    def _run(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, start: Tensor,
             stop_at: float) -> tuple[Tensor, Tensor]:
        """One FAB run from ``start``: the smallest fooling iterate and its norm (inf if none).

        The iterate and the step live in at least float32, as C&W's and FMN's do: in half precision
        a step shorter than half a unit in the last place would round back to where it started. The
        model sees each iterate rounded to ``x``'s dtype, and that rounded point, the one the model
        judged, is what gets recorded, with its own norm.
        """
        work = torch.promote_types(x.dtype, torch.float32)
        x_work, current = x.to(work), start.to(work)
        best = x.clone()
        norms = torch.full((x.shape[0],), torch.inf, device=x.device, dtype=work)
        active = torch.arange(x.shape[0], device=x.device)
        for _ in range(self.steps):
            x_nat, labels = x[active], y[active]
            here = current[active]
            normal, offset = self._linearise_at(model, here, x.dtype, labels,
                                                None if target is None else target[active])
            stepped = self._step(here, x_work[active], normal, offset)
            judged = stepped.to(x.dtype)
            with torch.no_grad():
                logits = model(judged)
            # fooled only where a batch of another size would judge it so too: the pull back steers by
            # the test the record takes (in bfloat16, a margin of 3% of the largest logit, which a
            # search steering by the plain boundary never crossed: 59 of 100 points found, not 100)
            fooled = fooled_beyond_rounding(logits, labels)
            dist = self.threat.distance(judged, x_nat)
            better = fooled & (dist < norms[active])
            best[active[better]] = judged[better]
            norms[active[better]] = dist[better]
            pulled = x_work[active] + self.beta * (stepped - x_work[active])
            current[active] = torch.where(_expand(fooled, stepped), pulled, stepped)
            # an example already fooled within stop_at has what the caller needs
            active = active[norms[active] > stop_at]
            if active.numel() == 0:
                break
        return best, norms

    def _linearise_at(self, model: nn.Module, here: Tensor, dtype: torch.dtype, y: Tensor,
                      target: Tensor | None) -> tuple[Tensor, Tensor]:
        """``_linearise`` at the search point ``here`` (float32 or wider) for a model that takes
        ``dtype``: the model is linearised at ``here`` rounded to ``dtype`` and the hyperplane's
        offset is moved from that point to ``here``, so a step from ``here`` aims at the same plane."""
        if here.dtype == dtype:
            return self._linearise(model, here, y, target)
        rounded = here.to(dtype)
        normal, offset = self._linearise(model, rounded, y, target)
        normal, offset = normal.to(here.dtype), offset.to(here.dtype)
        return normal, offset - (normal * _flat(here - rounded.to(here.dtype))).sum(dim=1)

    def _linearise(self, model: nn.Module, point: Tensor, y: Tensor,
                   target: Tensor | None) -> tuple[Tensor, Tensor]:
        """Hyperplane ``<normal, delta> = offset`` (flat normal) where the linearised
        ``f_s - f_y`` reaches the rounding margin at ``point + delta``, for the closest class ``s``
        or the target: a point is recorded only beyond that margin, 3% of the largest logit in
        bfloat16, where steps aimed at the plain crossing found 55-59 of 100 points."""
        point = point.detach().requires_grad_(True)
        logits = model(point)
        rows = torch.arange(point.shape[0], device=point.device)
        aim = rounding_margin(logits.detach())
        if target is not None:
            gap = logits[rows, target] - logits[rows, y]
            (grad,) = torch.autograd.grad(gap.sum(), point)
            return _flat(grad), aim - gap.detach()
        gaps = (logits - logits[rows, y][:, None]).detach()
        grads = self._gap_gradients(logits, point, y)
        distance = gaps.abs() / (dual_norm(grads, self.threat.norm) + _GRAD_FLOOR)
        distance[rows, y] = torch.inf
        closest = distance.argmin(dim=1)
        return grads[rows, closest], aim - gaps[rows, closest]

    @staticmethod
    def _gap_gradients(logits: Tensor, point: Tensor, y: Tensor) -> Tensor:
        """(N, K, D): gradient of ``f_k - f_y`` for every class ``k``, one backward pass per class."""
        rows = torch.arange(point.shape[0], device=point.device)
        true = logits[rows, y]
        num_classes = logits.shape[1]
        grads = [torch.autograd.grad((logits[:, k] - true).sum(), point,
                                     retain_graph=k < num_classes - 1)[0]
                 for k in range(num_classes)]
        return torch.stack(grads, dim=1).reshape(point.shape[0], num_classes, -1)

    def _step(self, current: Tensor, x: Tensor, normal: Tensor, offset: Tensor) -> Tensor:
        """The biased, overshooting step of Algorithm 1, clipped into the box."""
        here, origin = _flat(current), _flat(x)
        # the same hyperplane seen from x: <normal, x + delta - current> = offset
        offset_origin = offset - (normal * (origin - here)).sum(dim=1)
        deltas = project_onto_hyperplane_in_box(
            torch.cat((here, origin)), torch.cat((normal, normal)),
            torch.cat((offset, offset_origin)), self.threat.bounds, self.threat.norm).to(here.dtype)
        d_here, d_origin = deltas.chunk(2)
        len_here = vector_norm(d_here, self.threat.norm).clamp_min(_STEP_FLOOR)
        len_origin = vector_norm(d_origin, self.threat.norm).clamp_min(_STEP_FLOOR)
        alpha = (len_here / (len_here + len_origin)).clamp(0.0, self.alpha_max)[:, None]
        moved = (1 - alpha) * (here + self.eta * d_here) + alpha * (origin + self.eta * d_origin)
        return self._box.project(moved.reshape(current.shape), current)

    @property
    def _box(self) -> ThreatModel:
        # an L-inf ball as wide as the box contains the box, so its projection is the box clip
        lo, hi = self.threat.bounds
        return ThreatModel("linf", hi - lo, (lo, hi))

    @torch.no_grad()
    def _final_search(self, model: nn.Module, x: Tensor, y: Tensor, best: Tensor,
                      norms: Tensor) -> None:
        """Shrink each found point towards ``x`` along their segment (in place).

        ``outside`` stays fooled beyond rounding (``fooled_beyond_rounding``) and ``inside`` short of
        that; each probe is where the logits, interpolated linearly between the two, would put the
        found class ahead of the label by the rounding margin. Aimed at the crossing itself, the
        probes ended so close to it that a batch of another size judged some of the points correct
        (on CPU, batches of one row against batches of many).
        """
        found = (torch.isfinite(norms) & (norms > 0)).nonzero().squeeze(1)
        if self.search_steps == 0 or found.numel() == 0:
            return
        rows = torch.arange(found.numel(), device=x.device)
        labels = y[found]
        inside, outside, out_norms = x[found].clone(), best[found].clone(), norms[found].clone()
        in_logits, out_logits = model(inside), model(outside)
        out_label = out_logits.argmax(dim=1)
        for _ in range(self.search_steps):
            margin_in = in_logits[rows, labels] - in_logits[rows, out_label]
            margin_out = out_logits[rows, out_label] - out_logits[rows, labels]
            aim = rounding_margin(out_logits)
            t = (margin_in + aim) / (margin_in + margin_out).clamp_min(torch.finfo(margin_in.dtype).tiny)
            t = torch.where((t >= 0) & (t <= 1), t, torch.ones_like(t)).to(x.dtype)
            probe = inside + _expand(t, inside) * (outside - inside)
            probe_logits = model(probe)
            probe_label = probe_logits.argmax(dim=1)
            probe_norms = self.threat.distance(probe, x[found])
            # rounding may put a probe a hair beyond the point it should improve on
            beyond = fooled_beyond_rounding(probe_logits, labels)
            fooled = beyond & (probe_norms <= out_norms)
            kept = ~beyond
            outside[fooled], out_logits[fooled] = probe[fooled], probe_logits[fooled]
            out_label[fooled], out_norms[fooled] = probe_label[fooled], probe_norms[fooled]
            inside[kept], in_logits[kept] = probe[kept], probe_logits[kept]
        best[found], norms[found] = outside, out_norms


class FABTargeted(FAB):
    """FAB-T: FAB towards each of the top ``n_target_classes`` non-true clean-logit classes in turn."""

    name = "fab-t"

    def __init__(
        self,
        threat: ThreatModel,
        *,
        n_target_classes: int = 9,
        steps: int = 100,
        restarts: int = 1,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        search_steps: int = 3,
        seed: int = 0,
    ) -> None:
        super().__init__(threat, steps=steps, restarts=restarts, alpha_max=alpha_max, eta=eta,
                         beta=beta, search_steps=search_steps, seed=seed)
        self.n_target_classes = check_positive_int("n_target_classes", n_target_classes)

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "n_target_classes": self.n_target_classes}

    def _targets(self, clean_logits: Tensor, y: Tensor) -> list[Tensor | None]:
        return list(top_target_classes(clean_logits, y, self.n_target_classes).unbind(dim=1))


ATTACKS.add("fab", FAB)
ATTACKS.add("fab-t", FABTargeted)
