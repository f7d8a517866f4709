"""Parameters and multiply-accumulates counted from the built model (behind ``cbam profile``).

The paper's "GFLOPs" are multiply-accumulates of convolutions and linear layers at 224 x 224, batch 1
(pooling and element-wise work not counted). We count them with ``torch.utils.flop_counter`` on the meta
device (no memory, no compute), so every number given here is measured from the model, never stored.
:func:`paper_table` puts each row of the paper's Tables 4 and 5 beside the measured values.
"""

from __future__ import annotations

import functools
from typing import Any

from .models._registry import model_meta
from .models.complexity import profile_model
from .models.paper import PAPER_ROWS

# columns of paper_table() shown in text formats, and their decimals
PAPER_COLUMNS = ["table", "model", "convention", "paper_params_m", "params_m", "params_diff", "paper_gflops", "gmacs",
                 "gflops_diff", "match"]
PAPER_DIGITS = {"paper_params_m": 2, "params_m": 2, "params_diff": 2, "paper_gflops": 3, "gmacs": 3,
                "gflops_diff": 3}
# decimals of profile_row()'s columns in text formats
ROW_DIGITS = {"params_m": 2, "gmacs": 3}


def paper_table() -> list[dict]:
    """Rows of Tables 4 and 5: the paper's params and GFLOPs beside the counted ones."""
    return [dict(row) for row in _paper_table()]


@functools.cache
def _paper_table() -> tuple[dict, ...]:
    rows = []
    for row in PAPER_ROWS:
        counted = row.profile()
        params = counted["params"] / 1e6
        gmacs = counted["macs"] / 1e9
        rows.append(
            {
                "table": row.table,
                "model": row.label,
                "convention": "v1 stride" if row.profile_kwargs.get("stride_in_1x1") else "",
                "paper_params_m": row.params_m,
                "params_m": round(params, 2),
                "params_diff": round(round(params, 2) - row.params_m, 2),
                "paper_gflops": row.gflops,
                "gmacs": round(gmacs, 3),
                "gflops_diff": round(round(gmacs, 3) - row.gflops, 3),
                "match": "yes" if round(params, 2) == row.params_m and round(gmacs, 3) == row.gflops else "no",
                "exact_params": counted["params"],
                "exact_macs": counted["macs"],
            }
        )
    return tuple(rows)


def profile_row(
    model: str,
    *,
    attention: str | None = None,
    input_size: tuple[int, int] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """One model's counted parameters and MACs as a report row (``attention``: None or "none" for no attention).

    ``input_size`` defaults to the model's registered resolution; ``kwargs`` go to ``create_model``.
    An unknown model or option is a ValueError.
    """
    attn = None if attention in (None, "none") else attention
    if input_size is not None:
        kwargs["input_size"] = input_size
    counted = profile_model(model, attention=attn, **kwargs)
    return {
        "model": model,
        "attention": attention or "none",
        "input": "x".join(map(str, input_size or (model_meta(model)["input_size"],) * 2)),
        "params_m": counted["params"] / 1e6,
        "gmacs": counted["macs"] / 1e9,
        "params": counted["params"],
        "macs": counted["macs"],
    }
