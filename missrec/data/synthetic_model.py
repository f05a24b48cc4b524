"""The generative model of the SYNTHETIC data (:mod:`missrec.data.synthetic` writes it): latent topics, item
popularity, user sequences and the feature rows of each item. Nothing here is real data."""

from __future__ import annotations

import numpy as np

# Generative-model constants (the model is described in missrec/data/synthetic.py's docstring).
SECONDARY_TOPIC_P = 0.25  # share of items with a secondary topic
SECONDARY_WEIGHT = 0.5  # weight of the secondary centre relative to the primary one
TOPIC_SIZE_ALPHA = 2.0  # Dirichlet concentration of topic sizes / popularity (larger = more even)
ZIPF_EXPONENT = 1.0  # within-topic popularity ~ 1 / rank**ZIPF_EXPONENT
USER_MAX_TOPICS = 4  # each user likes 1..USER_MAX_TOPICS topics
STAY_P = 0.75  # probability that the next item stays in the current topic
EXPLORE_P = 0.05  # probability that one step goes to a uniformly random topic
REPEAT_RETRIES = 8  # resampling rounds against repeats in a sequence: by popularity, then uniform
# Norms of the feature components (shared direction, topic centre, item noise) and the per-item scale spread,
# chosen to mimic real CLIP ViT-B/32 features (Scientific: mean row norm ~7.3 text, ~10.3 image; mean pairwise
# cosine ~0.5-0.6). Same-topic cosine ~0.8, cross-topic ~0.5.
FEATURE_NORMS: dict[str, tuple[float, float, float]] = {"text": (5.5, 4.5, 3.5), "image": (8.0, 5.0, 4.0)}
ITEM_SCALE_SIGMA = 0.06


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def item_structure(
    rng: np.random.Generator, num_items: int, num_topics: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Topics and popularity of the items.

    Returns ``topic`` (N,) primary topic, ``secondary`` (N,) secondary topic or -1, ``topic_weight`` (T,)
    topic popularity, and the sampling tables ``order`` (N,) items sorted by topic then popularity rank and
    ``cdf`` (N,) = topic + within-topic cumulative popularity in (0, 1] (non-decreasing; see _sample_items).
    """
    topic_weight = rng.dirichlet(np.full(num_topics, TOPIC_SIZE_ALPHA))
    # Every topic gets at least half the mean topic size (and >= 1 item); the rest are drawn by topic weight;
    # then ids are shuffled.
    floor = np.repeat(np.arange(num_topics), max(1, num_items // (2 * num_topics)))
    rest = rng.choice(num_topics, size=num_items - floor.shape[0], p=topic_weight)
    topic = np.concatenate([floor, rest])
    rng.shuffle(topic)
    secondary = np.full(num_items, -1, dtype=np.int64)
    if num_topics > 1:
        has_second = rng.random(num_items) < SECONDARY_TOPIC_P
        offset = rng.integers(1, num_topics, size=num_items)
        secondary[has_second] = (topic[has_second] + offset[has_second]) % num_topics
    # Zipf-like popularity within a topic: a random rank per item, weight 1 / (rank + 1)**a.
    order = np.lexsort((rng.random(num_items), topic))  # stable order: by topic, then random key
    sorted_topic = topic[order]
    starts = np.searchsorted(sorted_topic, np.arange(num_topics))
    rank = np.arange(num_items) - starts[sorted_topic]
    cum = np.cumsum((rank + 1.0) ** -ZIPF_EXPONENT)
    base = np.where(starts > 0, cum[np.maximum(starts - 1, 0)], 0.0)
    ends = np.append(starts[1:], num_items)
    total = cum[ends - 1] - base
    cdf = sorted_topic + (cum - base[sorted_topic]) / total[sorted_topic]
    return topic.astype(np.int64), secondary, topic_weight, order, cdf


def sample_items(
    rng: np.random.Generator, topics: np.ndarray, order: np.ndarray, cdf: np.ndarray, *, uniform: bool = False
) -> np.ndarray:
    """One item per entry of ``topics``, drawn by popularity within that topic (or uniformly within it).

    (K,) topics -> (K,) item indexes.
    """
    u = rng.random(topics.shape[0])
    if uniform:  # topic t is order[start:end]; start, end = first positions with cdf > t, cdf > t + 1
        start = np.searchsorted(cdf, topics, side="right")
        size = np.searchsorted(cdf, topics + 1, side="right") - start
        pos = start + (u * size).astype(np.int64)
    else:  # cdf is topic + cumulative share, so topic t's items span (t, t + 1]; t + u lands there
        pos = np.searchsorted(cdf, topics + u, side="right")
    return order[np.minimum(pos, cdf.shape[0] - 1)]


def user_sequences(
    rng: np.random.Generator,
    *,
    num_users: int,
    num_topics: int,
    topic_weight: np.ndarray,
    order: np.ndarray,
    cdf: np.ndarray,
    min_seq_len: int,
    max_seq_len: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Sequences ``seq`` (U, max_seq_len) item indexes, -1 after each user's length, and ``lengths`` (U,)."""
    k = min(USER_MAX_TOPICS, num_topics)
    users = np.arange(num_users)
    liked = rng.choice(num_topics, size=(num_users, k), p=topic_weight)  # (U, K); repeats just merge weight
    n_liked = rng.integers(1, k + 1, size=num_users)
    pref = rng.dirichlet(np.ones(k), size=num_users)
    pref[np.arange(k)[None, :] >= n_liked[:, None]] = 0.0
    cum_pref = np.cumsum(pref / pref.sum(axis=1, keepdims=True), axis=1)  # (U, K)
    lengths = rng.integers(min_seq_len, max_seq_len + 1, size=num_users)

    def pick_slot() -> np.ndarray:
        slot = (cum_pref < rng.random(num_users)[:, None]).sum(axis=1)
        return np.minimum(slot, n_liked - 1)

    seq = np.full((num_users, max_seq_len), -1, dtype=np.int64)
    slot = pick_slot()
    for t in range(max_seq_len):
        if t > 0:
            switch = rng.random(num_users) >= STAY_P
            slot = np.where(switch, pick_slot(), slot)
        topic = liked[users, slot]
        explore = rng.random(num_users) < EXPLORE_P
        topic = np.where(explore, rng.integers(0, num_topics, size=num_users), topic)
        items = sample_items(rng, topic, order, cdf)
        for attempt in range(REPEAT_RETRIES):
            dup = np.flatnonzero((seq[:, :t] == items[:, None]).any(axis=1))
            if dup.size == 0:
                break
            uniform = attempt >= REPEAT_RETRIES // 2
            items[dup] = sample_items(rng, topic[dup], order, cdf, uniform=uniform)
        seq[:, t] = items
    seq[np.arange(max_seq_len)[None, :] >= lengths[:, None]] = -1
    return seq, lengths
