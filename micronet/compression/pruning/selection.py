"""Channel selection: which units of a :class:`~micronet.compression.pruning.graph.ChannelGraph` to remove.

Importance of a unit (one channel, or the channels tied to it through residual adds and shuffles):

* ``"bn_gamma"`` (default, network slimming): |γ| of the BatchNorm reading the channel. A unit read by several
  BatchNorms (a residual stage, shuffle-tied channels) takes the **max** over them: the channel is kept when
  any of its layers needs it, and the value stays on the same scale as a single BatchNorm's so one global
  threshold is fair (a sum would favour multi-member units just for having more members). Groups that no
  BatchNorm reads are listed as unprunable (use ``"l1"``).
* ``"l1"``: mean |w| of the producing filter divided by the mean of that over its layer (layers trained
  without BatchNorm have very different weight scales; without this a global threshold empties the
  layer with the smallest initialisation first), max over the unit's filters.

Threshold: the ``floor(n · percent)`` least important of the ``n`` prunable units are removed, ties broken by
position (earlier channel first). This re-derives the original's ``sorted[int(n·p)]`` threshold with strict
``>``, which removed one unit too many (even at ``percent=0``) and every unit tied with the threshold.

Per layer (per *family*: the units of one component that occupy the same layers; a grouped conv splits a
family into one *cell* per group, and every cell keeps the same count ``k``, chosen by top-k per group):
``k`` is the family's surviving count divided by its number of cells, raised to ``min_channels``, then
rounded to the nearest value that makes every layer's channel count a multiple of ``normal_regular`` (ties
go up, never 0, capped at — and allowing — the full width). The original rounded only when
``remain > N`` and so left layers with fewer than N channels unrounded; here they round up to N.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from numbers import Integral, Real

from micronet.compression.pruning.graph import ChannelGraph
from micronet.errors import PruningError

__all__ = ["IMPORTANCES", "Selection", "check_options", "select_channels"]

IMPORTANCES = ("bn_gamma", "l1")


@dataclass
class Selection:
    """The result: removed unit roots, plus components that cannot be pruned and why."""

    graph: ChannelGraph
    removed: set[int] = field(default_factory=set)
    unprunable: dict[int, list[str]] = field(default_factory=dict)  # component id → reasons

    def kept(self, elem: int) -> bool:
        return self.graph.units.find(elem) not in self.removed

    def keep_positions(self, elems: list[int]) -> list[int]:
        return [p for p, e in enumerate(elems) if self.kept(e)]

    def plan(self) -> dict[str, tuple[list[int], list[int]]]:
        """Module path → (kept input positions, kept output positions), for every analysed module."""
        out: dict[str, tuple[list[int], list[int]]] = {}
        for path, use in self.graph.uses.items():
            keep_in = self.keep_positions(use.in_elems)
            keep_out = keep_in if use.out_space is None else self.keep_positions(use.out_elems())
            out[path] = (keep_in, keep_out)
        return out


def check_options(percent: float, normal_regular: int | None, importance: str, min_channels: int) -> None:
    """Raise :class:`PruningError` naming the bad option and its fix."""
    if isinstance(percent, bool) or not isinstance(percent, Real) or not 0 <= percent < 1:
        raise PruningError(f"percent must be a fraction in [0, 1) of the channels to remove (got {percent!r}): "
                           "e.g. percent=0.5 removes half")
    if normal_regular is not None and (isinstance(normal_regular, bool) or not isinstance(normal_regular, Integral)
                                       or normal_regular < 1):
        raise PruningError(f"normal_regular must be None or a positive integer (got {normal_regular!r}): e.g. 8 keeps "
                           "every layer's channel count a multiple of 8")
    if importance not in IMPORTANCES:
        raise PruningError(f"importance must be one of {', '.join(IMPORTANCES)} (got {importance!r})")
    if isinstance(min_channels, bool) or not isinstance(min_channels, Integral) or min_channels < 1:
        raise PruningError(f"min_channels must be a positive integer (got {min_channels!r}): a layer keeps at least "
                           "one channel")


def _importance(graph: ChannelGraph, importance: str) -> dict[int, float]:
    terms = graph.bn_terms if importance == "bn_gamma" else list(graph.l1_terms.items())
    out: dict[int, float] = {}
    for elem, value in terms:
        root = graph.units.find(elem)
        out[root] = max(out.get(root, value), value)
    return out


def _block(unprunable: dict[int, list[str]], comp: int, reason: str) -> None:
    reasons = unprunable.setdefault(comp, [])
    if reason not in reasons:
        reasons.append(reason)


def _allowed_counts(size: int, step: int) -> list[int]:
    counts = list(range(step, size + 1, step))
    if size not in counts:
        counts.append(size)  # the full width is always allowed
    return counts


def _group_labels(g: ChannelGraph, comp_of: dict[int, int], unprunable: dict[int, list[str]]) -> dict[int, list[tuple[int, int]]]:
    """Group constraints: each unit is either spread evenly over a grouped conv's groups (free) or inside one
    group (labelled with it); anything else blocks the unit's component."""
    labels: dict[int, list[tuple[int, int]]] = {}
    for ci, c in enumerate(g.constraints):
        hist: dict[int, Counter] = {}
        for e, lab in zip(c.elems, c.labels):
            hist.setdefault(g.units.find(e), Counter())[lab] += 1
        one_hot_counts = set()
        for root, h in hist.items():
            if len(h) == c.groups and len(set(h.values())) == 1:
                continue
            if len(h) == 1:
                labels.setdefault(root, []).append((ci, next(iter(h))))
                one_hot_counts.add(next(iter(h.values())))
            else:
                _block(unprunable, comp_of[root], f"grouped conv '{c.path}' (groups={c.groups}, {c.side}) mixes "
                                                  "channels of one unit across its groups")
        if len(one_hot_counts) > 1:
            for root in hist:
                _block(unprunable, comp_of[root], f"grouped conv '{c.path}' (groups={c.groups}, {c.side}) gets "
                                                  "channels in unequal bundles")
    return labels


def _families(g: ChannelGraph, members: dict[int, list[int]], comp_of: dict[int, int], unprunable: dict[int, list[str]],
              labels: dict[int, list[tuple[int, int]]]) -> dict[tuple, dict[tuple, list[int]]]:
    """Families (units of one component over the same layers and groups) split into cells (one per group
    label); a family whose cells cannot shrink equally blocks its component."""
    families: dict[tuple, dict[tuple, list[int]]] = {}
    for root, elems in members.items():
        if comp_of[root] in unprunable:
            continue
        spaces = tuple(sorted(Counter(g.elem_space[e] for e in elems).items()))
        labs = sorted(labels.get(root, []))
        fam = (comp_of[root], spaces, tuple(ci for ci, _ in labs))
        families.setdefault(fam, {}).setdefault(tuple(lab for _, lab in labs), []).append(root)
    for fam, cells in families.items():
        sizes = {len(v) for v in cells.values()}
        problem = None
        if len(sizes) > 1:
            problem = "its groups hold unequal numbers of channels"
        for pos, ci in enumerate(fam[2]):
            c = g.constraints[ci]
            per_label = Counter(key[pos] for key in cells)
            if len(per_label) != c.groups or len(set(per_label.values())) > 1:
                problem = (f"grouped conv '{c.path}' (groups={c.groups}, {c.side}) gets these channels in only "
                           f"{len(per_label)} of its groups, so its groups cannot stay equal")
        if problem is None and fam[2] and sizes == {1}:
            c = g.constraints[fam[2][0]]
            problem = (f"grouped conv '{c.path}' (groups={c.groups}, {c.side}) has one channel per group, so a "
                       "channel cannot go without emptying its group")
        if problem:
            _block(unprunable, fam[0], problem)
    return families


def _family_removals(g: ChannelGraph, fam: tuple, cells: dict[tuple, list[int]], doomed: set[int],
                     imp: dict[int, float], n_reg: int, min_channels: int) -> set[int]:
    """The units one family loses: every cell keeps the same allowed count k nearest to the survivors of the
    global threshold, and loses its least important units."""
    n_cells = len(cells)
    size = len(next(iter(cells.values())))
    survivors = sum(1 for roots in cells.values() for r in roots if r not in doomed)
    k_raw = survivors / n_cells
    widths = [n_cells * cnt for _, cnt in fam[1]]  # channels one k adds to each layer
    for sid, _ in fam[1]:
        space = g.spaces[sid]
        if n_reg > space.size:
            raise PruningError(f"normal_regular={n_reg} is larger than layer '{space.name}' ({space.size} "
                               f"channels): choose normal_regular <= {space.size} or add '{space.name}' to "
                               "ignored_layers (`micronet prune --ignore`)")
    step = math.lcm(*(n_reg // math.gcd(n_reg, w) for w in widths))
    k_min = min(size, max(1, math.ceil(min_channels / min(widths))))
    counts = [k for k in _allowed_counts(size, step) if k >= k_min] or [size]
    k = min(counts, key=lambda v: (abs(v - k_raw), -v))
    removed: set[int] = set()
    for roots in cells.values():
        ranked = sorted(roots, key=lambda r: (-imp[r], -r))  # the reverse of the removal order
        removed.update(ranked[k:])
    return removed


def select_channels(graph: ChannelGraph, percent: float, normal_regular: int | None = None,
                    importance: str = "bn_gamma", min_channels: int = 1) -> Selection:
    """Choose the units to remove (see the module docstring for the rules)."""
    check_options(percent, normal_regular, importance, min_channels)
    g = graph
    unprunable = g.component_reasons()
    members: dict[int, list[int]] = {}
    for e in range(len(g.elem_space)):
        members.setdefault(g.units.find(e), []).append(e)
    comp_of = {r: g.component(g.elem_space[r]) for r in members}

    imp = _importance(g, importance)
    for root, comp in comp_of.items():
        if root not in imp and comp not in unprunable:
            why = ("no BatchNorm reads these channels (importance='bn_gamma'): pass importance='l1' to prune them"
                   if importance == "bn_gamma" else "no conv or linear layer writes these channels")
            _block(unprunable, comp, why)

    labels = _group_labels(g, comp_of, unprunable)
    families = _families(g, members, comp_of, unprunable, labels)

    # Global threshold over prunable units.
    prunable = sorted((r for r in members if comp_of[r] not in unprunable), key=lambda r: (imp[r], r))
    doomed = set(prunable[:int(len(prunable) * percent)])

    removed: set[int] = set()
    for fam, cells in families.items():
        if fam[0] not in unprunable:
            removed |= _family_removals(g, fam, cells, doomed, imp, normal_regular or 1, min_channels)
    return Selection(g, removed, unprunable)
