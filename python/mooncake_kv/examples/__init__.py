"""Examples shipped with the package, each with its own tests (``python/tests``).

- :mod:`mooncake_kv.examples.prefix_cache`: a reference serving loop that keeps a real
  transformer's prompt-prefix KV in a store and fetches it instead of recomputing it
  (needs ``torch`` and ``transformers``: ``pip install 'mooncake-kv[model]'``).
"""
