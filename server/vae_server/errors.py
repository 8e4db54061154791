"""Domain errors of the server. `vae_server.servicer` maps them to gRPC status codes in one
place; anything else that escapes a handler becomes INTERNAL."""

from __future__ import annotations


class ServingError(Exception):
    """Base of the errors a caller can be told about."""


class InvalidArgument(ServingError):
    """A request field is out of its limits; the message names the field and the limit."""


class OtherModel(ServingError):
    """The request names a model version (model_version) other than the one served."""


class QueueFull(ServingError):
    """The model's queue has no room for the call's images: retry later."""


class DeadlineExpired(ServingError):
    """The caller's deadline passed while the call was queued; it never ran."""


class ShuttingDown(ServingError):
    """The server is stopping and takes no more work: another replica, or this one once it
    is back, will (clients retry it as UNAVAILABLE)."""


class BatchFailed(ServingError):
    """The model run that held this call failed (a server fault)."""

