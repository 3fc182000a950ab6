"""What an NPT adapter set is: which layers, what rank, safe mode. Saved next to the adapter weights."""

import dataclasses
from dataclasses import dataclass

from nanoseek.model.layers import MLP

DEFAULT_RANK = 16
LAYER_SPEC_HELP = ("'upper' (the upper half of the dense-MLP layers), 'all' (every dense-MLP layer), or "
                   "comma-separated layer ids and inclusive ranges such as '2,3' or '1-3' (negative ids count "
                   "from the end: '-1' is the last layer)")


@dataclass(frozen=True)
class AdapterConfig:
    layers: tuple[int, ...]  # converted layer ids, ascending
    rank: int = DEFAULT_RANK  # width of the low-rank projection of the attention output
    safe_mode: bool = False  # the additive path only (no multiplicative gate modulation)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("layers=(): convert at least one layer; pass --layers " + LAYER_SPEC_HELP)
        if any(not isinstance(i, int) or i < 0 for i in self.layers) or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers={self.layers!r}: must be distinct non-negative layer ids in ascending order")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r}: must be a positive int (e.g. --rank 16)")

    @classmethod
    def from_dict(cls, values: dict) -> "AdapterConfig":
        known = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"adapter config: unknown field {unknown[0]!r}; known fields are {', '.join(known)}")
        return cls(layers=tuple(int(i) for i in values["layers"]), rank=int(values.get("rank", DEFAULT_RANK)),
                   safe_mode=bool(values.get("safe_mode", False)))


def parse_layers(spec: str, model) -> tuple[int, ...]:
    """A --layers spec (LAYER_SPEC_HELP) -> ascending layer ids of `model`, every one a dense SwiGLU MLP layer
    (NPT modulates its gate)."""
    n_layers = len(model.layers)
    dense = [i for i, block in enumerate(model.layers) if isinstance(block.ffn, MLP)]
    spec = spec.strip().lower()
    if spec in ("upper", "all"):
        if not dense:
            raise ValueError(f"--layers {spec}: the model has no dense-MLP layer (all {n_layers} are MoE); NPT "
                             "modulates a dense SwiGLU MLP's gate")
        return tuple(dense[len(dense) // 2:] if spec == "upper" else dense)
    ids: set[int] = set()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        try:
            if item.lstrip("-").isdigit():
                value = int(item)
                ids.add(value + n_layers if value < 0 else value)
            else:
                first, _, last = item.partition("-")
                ids.update(range(int(first), int(last) + 1))
        except ValueError:
            raise ValueError(f"--layers {spec!r}: cannot read {item!r}; write {LAYER_SPEC_HELP}") from None
    if not ids:
        raise ValueError(f"--layers {spec!r} names no layer; write {LAYER_SPEC_HELP}")
    outside = sorted(i for i in ids if not 0 <= i < n_layers)
    if outside:
        raise ValueError(f"--layers {spec!r}: layer {outside[0]} does not exist (the layers are 0-{n_layers - 1})")
    moe = sorted(ids - set(dense))
    if moe:
        raise ValueError(f"--layers {spec!r}: layer {moe[0]} is a mixture-of-experts layer; NPT modulates a dense "
                         f"SwiGLU MLP's gate, choose among the dense layers {dense}")
    return tuple(sorted(ids))
