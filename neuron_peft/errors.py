"""Every exception a user of neuron_peft can catch, in one place (all exported from ``neuron_peft``).

Each is a subclass of the built-in error a caller would otherwise have caught (``ValueError`` / ``ImportError``), so
code written against the built-ins keeps working; the messages name the file, module, parameter or option at fault.
This module imports nothing, so any part of the package can raise these without import-order concerns.
"""

from __future__ import annotations


class AdapterFileError(ValueError):
    """An adapter weights file is unreadable (corrupt or truncated) or holds tensors that are not this adapter's."""


class AdapterMismatchError(ValueError):
    """An adapter (config or weights) does not fit the model it is being applied to."""


class NonFiniteDeltaError(ValueError):
    """A delta holds NaN or Inf, so saving or merging it would spread a diverged run into files or base weights."""


class RoutingError(ValueError):
    """Group names (or group indices) that do not fit the adapter's language groups or the batch."""


class OutputPathError(ValueError):
    """An output path that would overwrite or destroy something the command did not create."""


class ResourceMissingError(ImportError):
    """A resource's PyPI package (or a package needed to read it) is not installed; the message says what to run."""


__all__ = [
    "AdapterFileError",
    "AdapterMismatchError",
    "NonFiniteDeltaError",
    "OutputPathError",
    "ResourceMissingError",
    "RoutingError",
]
