"""Errors that the CLI turns into one clear line and a non-zero exit."""

from __future__ import annotations


class KdpipeError(Exception):
    """A user-facing error: the message names the file, field or flag and says how to fix it."""


class ConfigError(KdpipeError):
    """A configuration value (YAML key or CLI flag) is invalid or inconsistent."""


class DatasetError(KdpipeError):
    """A dataset cannot be loaded or lacks a field the recipe needs."""


class ModelError(KdpipeError):
    """A teacher or student model cannot be loaded or does not fit the cache."""
