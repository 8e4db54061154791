"""Client library of vae-serving: `VaeClient` (sync) and `AsyncVaeClient` (asyncio)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vae_client._codec import Scores
    from vae_client.aio import AsyncVaeClient
    from vae_client.client import VaeClient
    from vae_client.errors import VaeError

__all__ = ["AsyncVaeClient", "Scores", "VaeClient", "VaeError"]

# Loaded when first asked for, so that `vae-client` (vae_client.__main__, which imports this
# package first) can set gRPC's log verbosity before gRPC loads.
_HOMES = {"Scores": "vae_client._codec", "AsyncVaeClient": "vae_client.aio",
          "VaeClient": "vae_client.client", "VaeError": "vae_client.errors"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'vae_client' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value
