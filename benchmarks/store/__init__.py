"""`beluga bench`: the store against memcpy, Redis and its TCP transport, and a model's KV through the pool.

* ``benchmarks.store.run``   -- the command: orchestration, statistics, targets, JSON, PNG, Markdown
* ``benchmarks.store.store`` -- the measuring worker processes and a lean Redis (RESP) client
* ``benchmarks.store.kv``    -- prefix-KV reuse with a random-weight transformers Llama (also used by a CI test)

Nothing here is imported by the store itself; numpy, torch, transformers and
matplotlib are imported only by the parts that need them. See docs/benchmarks.md.
"""
