"""The frozen reference: its model, the pass that scores every pair once, and the cache it writes.

engine.py       load (whole, or ZeRO-3 partitioned), run and free the reference model
partitioned.py  each rank reads only its slice of the weights into ZeRO-3 partitions
precompute.py   the reference pass over the missing cache shards; the resident reference
cache.py        the cache's format, fingerprint, refusal of stale caches, reading
"""
