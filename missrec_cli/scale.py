"""Options of training at catalogue scale shared by `train` and `compare`: the sampled softmax, bounded
validation, several processes (:mod:`missrec.training.sampled`, :mod:`missrec.training.distributed`)."""

from __future__ import annotations

from typing import Annotated

import typer

from missrec_cli.common import fail

Negatives = Annotated[
    int | None,
    typer.Option(
        help="Sampled softmax: negatives per step (0 = full softmax; default: full up to 20,000 items, else 2048)."
    ),
]
Sampler = Annotated[str, typer.Option(help="Sampled negatives: uniform or mixed (half by training popularity).")]
ValidRows = Annotated[int, typer.Option(help="Early stopping on this many validation rows (seeded sample; 0 = all).")]
TestRows = Annotated[
    int,
    typer.Option(
        help="Final test metrics on this many test rows (one fixed sample, the same for every model and seed; "
        "0 = all): at catalogues where ranking every test row against every item takes too long."
    ),
]


Autocast = Annotated[
    str,
    typer.Option(
        help="Mixed precision of the training forward passes: none (float32) or bf16 (torch.autocast bfloat16; "
        "weights, optimiser and validation stay float32)."
    ),
]


SparseIds = Annotated[
    bool,
    typer.Option(
        "--sparse-ids/--dense-ids",
        help="Sampled softmax: lazy sparse updates (SparseAdam) of an ID table (SASRec's), only the rows a step "
        "touches; --dense-ids: dense Adam on every row every step. Dense anyway with weight decay, clipping, "
        "--lr-scale or --distributed.",
    ),
]


def sampling_options(
    negatives: int | None,
    sampler: str,
    valid_rows: int,
    test_rows: int = 0,
    autocast: str = "none",
    sparse_ids: bool = True,
) -> dict:
    """The sampled-softmax and precision options, refused at start-up when out of range."""
    from missrec.training.loop import AUTOCAST
    from missrec.training.sampled import SAMPLERS

    if autocast not in AUTOCAST:
        raise fail(f"--autocast must be one of {', '.join(AUTOCAST)}, not {autocast!r}")

    if negatives is not None and negatives < 0:
        raise fail(f"--negatives must be >= 0 (0 = full softmax), not {negatives}")
    if sampler not in SAMPLERS:
        raise fail(f"--sampler must be one of {', '.join(SAMPLERS)}, not {sampler!r}")
    if valid_rows < 0:
        raise fail(f"--valid-rows must be >= 0 (0 = all), not {valid_rows}")
    if test_rows < 0:
        raise fail(f"--test-rows must be >= 0 (0 = all), not {test_rows}")
    return {
        "negatives": negatives,
        "sampler": sampler,
        "valid_rows": valid_rows,
        "test_rows": test_rows,
        "autocast": autocast,
        "sparse_ids": sparse_ids,
    }


Distributed = Annotated[
    bool,
    typer.Option(
        "--distributed",
        help="Fine-tune with DistributedDataParallel under torchrun (gloo on CPU, NCCL on GPU); rank 0 writes.",
    ),
]
