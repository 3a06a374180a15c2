"""Variant switches shared by the experiment configs (`--config=configs/x.py:variant`)."""

import ml_collections

VARIANTS = ("scorer", "evs", "random", "none", "noaux", "nobias", "r0.3", "r0.5", "r0.8")


def apply_variant(cfg: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Returns cfg with an ablation applied: scorer (default) | evs | random | none | noaux | nobias | r<ratio>."""
    arg = arg or "scorer"
    st = cfg.model.stts
    for part in arg.split(","):
        if part in ("scorer", "evs", "random", "none"):
            st.method = part
        elif part == "noaux":
            st.aux_loss_weight = 0.0
        elif part == "nobias":
            st.score_bias = False
        elif part.startswith("r"):
            st.prune_ratio = float(part[1:])
        else:
            raise ValueError(f"unknown config variant {part!r}; choose from {VARIANTS} (comma-separated)")
    return cfg
