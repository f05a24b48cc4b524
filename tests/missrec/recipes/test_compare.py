"""Merging compare runs of separate processes (seeds and/or models) gives the table of one run."""

import numpy as np
import pytest

from missrec.recipes.compare import Comparison, load_comparison, merge_comparisons, write_outputs

KEYS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50")


def _part(seeds, models, rng):
    cmp = Comparison("history_excluded", list(seeds))
    for s in seeds:
        cmp.per_seed[s] = {m: {"test": {k: float(rng.random()) for k in KEYS}} for m in models}
        cmp.details[s] = {m: {"wall_seconds": 1.0} for m in models}
    cmp.test_ndcg10 = {m: [np.round(rng.random(20), 6) for _ in seeds] for m in models}
    return cmp


def test_parts_by_seed_and_model_merge_into_the_whole(tmp_path):
    rng = np.random.default_rng(0)
    main = [_part([s], ["missrec_inductive", "sasrec"], rng) for s in (0, 1, 2)]
    cold = [_part([s], ["missrec_inductive_cold"], rng) for s in (0, 1, 2)]
    paths = []
    for i, part in enumerate(main + cold):
        paths.append(tmp_path / f"p{i}.json")
        write_outputs(paths[-1], part)
    merged = merge_comparisons([load_comparison(p) for p in reversed(paths)])
    assert merged.seeds == [0, 1, 2]
    assert set(merged.models) == {"missrec_inductive", "sasrec", "missrec_inductive_cold"}
    ndcg = merged.summary()["sasrec"]["test"]["ndcg@10"]
    assert ndcg["values"] == [main[s].per_seed[s]["sasrec"]["test"]["ndcg@10"] for s in (0, 1, 2)]
    versus = merged.versus_reference(resamples=200)
    assert set(versus) == {"missrec_inductive"}  # cold-protocol runs are trained on other rows
    ours = np.mean([main[s].test_ndcg10["missrec_inductive"][0] for s in (0, 1, 2)], axis=0)
    ref = np.mean([main[s].test_ndcg10["sasrec"][0] for s in (0, 1, 2)], axis=0)
    assert versus["missrec_inductive"]["mean_diff"] == pytest.approx(float((ours - ref).mean()))
    with pytest.raises(ValueError, match="appear twice"):
        merge_comparisons([main[0], main[0]])
    with pytest.raises(ValueError, match="different models"):
        merge_comparisons([main[0], cold[1]])


def test_compare_caps_mmsrec_only_at_the_default_epochs(monkeypatch):
    from missrec.recipes import mmsrec
    from missrec.training.loop import TrainOptions

    seen = []
    monkeypatch.setattr(mmsrec, "train_mmsrec", lambda ds, opts, **kw: seen.append(opts.epochs))
    run = mmsrec.COMPARE[0].recipe
    run(None, TrainOptions(), None)  # compare's default --epochs: the budget's cap
    run(None, TrainOptions(epochs=40), None)  # chosen: honoured
    run(None, TrainOptions(epochs=3), None)
    assert seen == [mmsrec.MMSREC_MAX_EPOCHS, 40, 3]
