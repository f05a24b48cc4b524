"""Redis persistence, one module per job, each over the service's one Redis client: user histories and the
idempotency of event calls (:mod:`~service.store.histories`), ingested and deleted items with the item-event stream
(:mod:`~service.store.items`), the announced serving bundle (:mod:`~service.store.announcements`).

Keys (``P`` = key prefix). Every multi-key operation is one Lua script whose keys share a Redis Cluster slot
through a hash tag, so the service works unchanged against Redis Cluster:

    P:u:{<h>}:hist          list of "<timestamp>\\x1f<item id>" entries, oldest first, capped at max_len
    P:u:{<h>}:id            the user id itself (a snapshot of the deployment reads it; same TTL as the history)
    P:u:{<h>}:idem:<key>    idempotency marker of an events call (24 h)    (<h> = sha1(user id)[:20])
    P:{items}:item:<id>     hash: an ingested item (features, vectors, clusters, text, thumbnail) or a tombstone
    P:{items}:ids           sorted set: item id -> version of its latest change (for replay at start-up)
    P:{items}:version       counter giving every item change a version
    P:{items}:epoch         random id of the counter's lifetime: a Redis that lost the counter (FLUSHDB, a
                            restart without AOF) gets a new one with its next write or replay
    P:{items}:events        stream of item changes (op, item_id, version, epoch, origin) read by every replica
    P:{bundle}:current      JSON: the announced serving bundle (generation, resolved path, version, when, by whom)
    P:{bundle}:generation   counter giving every announcement a generation (the last announced wins)
    P:{bundle}:events       stream of announcements: wakes every replica (the key above is what they follow)

Replicas apply an item change only if its version is above the one they hold, so a counter that goes back
would make acknowledged writes silently not apply: every change carries the epoch, and a replica that sees
another epoch, or a version not above one it has seen in this epoch, rebuilds from Redis (runtime).
"""

from service.store.announcements import Announcement, AnnouncementStore
from service.store.histories import CoalescedLists, HistoryStore, IdempotencyConflict, parse_history_entry
from service.store.items import ItemChange, ItemRecord, ItemsSnapshot, ItemStore

__all__ = [
    "Announcement",
    "AnnouncementStore",
    "CoalescedLists",
    "HistoryStore",
    "IdempotencyConflict",
    "ItemChange",
    "ItemRecord",
    "ItemStore",
    "ItemsSnapshot",
    "parse_history_entry",
]
