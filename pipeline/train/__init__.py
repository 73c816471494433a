"""Stage 2, `kdpipe train-student`: sparse KD losses, the cache stream, collation, students and the trainer.

May import ``cache_format`` and ``pipeline``'s top-level helpers; never ``pipeline.dump``, ``eval`` or ``demo``.
"""
