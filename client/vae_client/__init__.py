"""Client library of vae-serving: `VaeClient` (sync) and `AsyncVaeClient` (asyncio)."""

from vae_client._codec import Scores
from vae_client.aio import AsyncVaeClient
from vae_client.client import VaeClient
from vae_client.errors import VaeError

__all__ = ["AsyncVaeClient", "Scores", "VaeClient", "VaeError"]
