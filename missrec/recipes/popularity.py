"""Popularity's recipe: training interaction counts, evaluated like every other model (nothing to train)."""

from __future__ import annotations

from missrec.data.dataset import SeqDataset
from missrec.evaluation.cold import training_data
from missrec.models.popularity import Popularity, item_popularity
from missrec.recipes import CompareRun
from missrec.training.loop import TrainOptions
from missrec.training.run import RunResult, finish


def popularity(ds: SeqDataset, opts: TrainOptions | None = None) -> RunResult:
    """Training interaction counts, evaluated like every other model."""
    opts = opts or TrainOptions()
    data = training_data(ds, None, opts.seed)
    model = Popularity(item_popularity(data.train, ds.num_items))
    return finish(model, ds, data, opts, None)


COMPARE: tuple[CompareRun, ...] = (CompareRun("popularity", "popularity", lambda ds, o, c: popularity(ds, o)),)
