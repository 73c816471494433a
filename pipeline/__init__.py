"""Everything that runs models: top level = the ``kdpipe`` CLI, run configs + flags, errors, HF loading helpers.

Stages live in ``dump/`` (1), ``train/`` (2), ``eval/``, ``demo/``; none imports ``cli`` or a stage "up" from it.
"""
