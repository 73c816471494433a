"""`kdpipe demo` and the toys it and the tests use: a synthetic language, tiny tokenizers and models.

The one folder that may import every stage (it runs them end to end); no stage may import it.
"""
