"""benchmarks.ddp: real two-process gloo runs count the bytes each method all-reduces and its per-rank memory."""

from __future__ import annotations

import pytest

from benchmarks import ddp


@pytest.mark.slow
def test_bros_all_reduces_less_than_plain_ddp_and_is_not_wrapped_in_ddp(tmp_path):
    rows = ddp.measure("llama-xs", steps=3, batch_size=6, output_dir=str(tmp_path),
                       methods=["plain", "bros-r16-fd"])
    two = {row["method"]: row["ranks"] for row in rows if row["processes"] == 2}
    plain, bros = two["plain"][0], two["bros-r16-fd"][0]
    assert plain["wrapped_in_ddp"] and not bros["wrapped_in_ddp"]
    assert 0 < bros["bytes_per_step"] < plain["bytes_per_step"]
    # One r-dim term for the sketched lower gradients, one for the auxiliary residual, the full-space lower
    # gradients whole (and a few scalars): never a full-size copy of the sketched tensors.
    ratio = bros["bytes_per_step"] / plain["bytes_per_step"]
    assert ratio <= 2 * bros["r_over_n"] + bros["full_space_share"] + 0.01, ratio
    table = ddp.markdown(rows, "llama-xs")
    assert "| bros-r16-fd |" in table and "| plain |" in table
