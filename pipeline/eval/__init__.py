"""`kdpipe eval`: task metrics, teacher-student agreement and the `--compare` table.

May import ``cache_format``, ``pipeline``'s top-level helpers and ``pipeline.dump`` (recipes, teachers); never ``train`` or ``demo``.
"""
