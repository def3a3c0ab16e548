"""Foundation: what goes in and comes out. ``datasets`` (prompt sets), ``results`` (tidy tables and
run folders), ``provenance``, ``store`` (the cache-first activation store), ``unit_cache`` (unit
outputs and the one atomic write), ``plots`` and ``paths`` (the user cache root)."""
