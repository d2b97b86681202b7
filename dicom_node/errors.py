"""The node's own error types, in one module that imports nothing.

They are raised deep inside rooms (config parsing, TLS settings, weights loading) and
caught at the edges (the CLI, the service), so they live where every room can import
them without importing each other: ``net.tls`` raises :class:`ConfigError` without
importing ``config``, and the CLI catches :class:`WeightsError` without importing torch.
"""

from __future__ import annotations


class ConfigError(Exception):
    """The configuration is missing, unreadable or invalid."""


class WeightsError(Exception):
    """The weights file is missing, unreadable or not a dicom-node generator."""


class RequestRefused(Exception):
    """An admin command cannot do what was asked: a UID tail that matches no series or
    several, a series in a state the command does not apply to. The message says why and
    what to do instead."""


class LeaseLost(Exception):
    """A worker's job was taken over by another node (its lease expired): the job may not
    commit its result (fencing); the node that took it over commits the same outputs."""


class Superseded(LeaseLost):
    """A late instance reopened the series while its job ran (a new version): the job's
    result, made from fewer instances, may not be committed; the new version's job makes
    the result from all of them."""
