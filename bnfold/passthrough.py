"""Modules whose eval-mode forward returns its input tensor itself.

Both torch front ends see through them: the fold's reach follows a BN's output past them to
the layer that reads it, and the frontier plan of population mode knows that an in-place op
on their output writes their input. Only modules whose documented eval-mode forward returns
the very tensor it was given count: ``nn.Identity``, and torch's dropout modules outside
training (``F.dropout`` and its kin return the input unchanged when ``training`` is False).
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.dropout import _DropoutNd

__all__ = ["returns_its_input"]


def returns_its_input(module: nn.Module) -> bool:
    """Whether ``module(x)`` is ``x`` itself (an alias, not a copy), as called now."""
    if type(module) is nn.Identity:
        return True
    return isinstance(module, _DropoutNd) and not module.training
