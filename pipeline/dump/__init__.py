"""Stage 1, `kdpipe dump-teacher`: datasets, task recipes, teacher backends, and the run that writes a cache.

May import ``cache_format`` and ``pipeline``'s top-level helpers; never ``pipeline.train``, ``eval`` or ``demo``.
"""
