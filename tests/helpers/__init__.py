"""Builders shared by the tests: toy identities, caches, hostile caches, training helpers."""
