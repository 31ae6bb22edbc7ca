"""Age groups: presets and custom bin edges, and the mapping from an age to a group.

    groups = make_groups("decades")        # 0-9, 10-19, ..., 80-89, 90+
    groups = make_groups("0,13,20,40,60")  # 0-12, 13-19, 20-39, 40-59, 60+
    groups.index_of_age(34)                # -> 3 with decades
    groups.index_of_name("30-39")          # -> 3; unknown names list the valid ones

The `adience` preset has gaps between its groups (3, 7, 13-14, 21-24, 33-37,
44-47, 54-59): an age in a gap goes to the nearest group, and to the younger
group when both are equally near.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

# Each group is (low, high) in whole years, inclusive; high None means "and over".
PRESETS: dict[str, list[tuple[int, int | None]]] = {
    "decades": [(a, a + 9) for a in range(0, 90, 10)] + [(90, None)],
    "adience": [(0, 2), (4, 6), (8, 12), (15, 20), (25, 32), (38, 43), (48, 53), (60, None)],
    "fairface": [(0, 2), (3, 9)] + [(a, a + 9) for a in range(10, 70, 10)] + [(70, None)],
}
MAX_AGE = 130  # older is an impossible age in a manifest


@dataclass(frozen=True)
class AgeGroups:
    """An ordered list of age ranges; adjacent indices are adjacent ages."""

    spec: str
    ranges: tuple[tuple[int, int | None], ...]

    @property
    def names(self) -> list[str]:
        return [f"{lo}+" if hi is None else f"{lo}-{hi}" for lo, hi in self.ranges]

    @property
    def centers(self) -> list[float]:
        """A representative age per group, for mean absolute error in years."""
        out = []
        for lo, hi in self.ranges:
            out.append(lo + 5.0 if hi is None else (lo + hi) / 2.0)
        return out

    def __len__(self) -> int:
        return len(self.ranges)

    def index_of_age(self, age: float) -> int:
        if not 0 <= age <= MAX_AGE:
            raise ValueError(f"age {age} is outside 0-{MAX_AGE}")
        best, best_gap = 0, float("inf")
        for i, (lo, hi) in enumerate(self.ranges):
            top = float("inf") if hi is None else hi + 1  # ranges cover whole years
            if lo <= age < top:
                return i
            gap = lo - age if age < lo else age - (top - 1)
            if gap < best_gap:  # strict: ties keep the younger group
                best, best_gap = i, gap
        return best

    def index_of_name(self, name: str) -> int:
        names = self.names
        key = str(name).strip().replace(" ", "")
        if key in names:
            return names.index(key)
        raise ConfigError(
            f"age group {name!r} is not a group of bins {self.spec!r}; valid: {', '.join(names)}"
        )

    def to_dict(self) -> dict:
        return {"spec": self.spec, "names": self.names, "edges": [lo for lo, _ in self.ranges]}


def make_groups(spec: str) -> AgeGroups:
    """A preset name or comma-separated increasing lower edges starting at 0."""
    spec = str(spec).strip()
    if spec in PRESETS:
        return AgeGroups(spec, tuple(PRESETS[spec]))
    try:
        edges = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ConfigError(
            f"bins={spec!r} is neither a preset ({', '.join(PRESETS)}) "
            "nor comma-separated whole-year edges such as 0,13,20,40,60"
        ) from None
    if len(edges) < 2 or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ConfigError(
            f"bins={spec!r}: edges must start at 0 and increase, with at least two groups "
            "(for example 0,13,20,40,60)"
        )
    if edges[-1] > MAX_AGE:
        raise ConfigError(f"bins={spec!r}: the last edge must be at most {MAX_AGE}")
    ranges = [(a, b - 1) for a, b in zip(edges, edges[1:])] + [(edges[-1], None)]
    return AgeGroups(spec, tuple(ranges))


def groups_from_dict(d: dict) -> AgeGroups:
    """Rebuilds groups saved with `AgeGroups.to_dict` in a checkpoint."""
    return make_groups(d["spec"])
