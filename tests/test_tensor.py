"""vae_proto.tensor: the numpy <-> Tensor codec, and replies written as bytes."""

from __future__ import annotations

import numpy as np
import pytest

from vae_proto import vae_pb2
from vae_proto.tensor import (
    TensorError,
    TensorField,
    UIntField,
    from_tensor,
    message_bytes,
    to_tensor,
)

ARRAYS = [
    np.zeros((1, 28, 28), np.float32),
    np.arange(1024 * 784, dtype=np.float32).reshape(1024, 28, 28) / 7,
    np.arange(300 * 784, dtype=np.uint8).reshape(300, 784),
    np.zeros((0, 28, 28), np.float32),
    np.ones((3, 32), ">f4"),  # big-endian input goes out little-endian
    np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),  # not C-contiguous
    np.float32(2.5),  # 0-d: one element of shape [1], as to_tensor gives
]


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype}{list(np.shape(a))}")
@pytest.mark.parametrize("offset", [0, 1, 127, 128, 300, 2**40])
def test_fields_written_as_bytes_equal_the_serialised_messages(array, offset):
    expected = vae_pb2.SampleChunk(offset=offset, images=to_tensor(array)).SerializeToString()
    got = message_bytes(UIntField(vae_pb2.SampleChunk, "offset")(offset),
                        TensorField(vae_pb2.SampleChunk, "images")(array))
    assert got == expected


def test_field_numbers_come_from_the_descriptors():
    """Written for the field's own number: the latents of SampleResponse are field 2."""
    z = np.ones((2, 4), np.float32)
    reply = vae_pb2.SampleResponse.FromString(
        message_bytes(TensorField(vae_pb2.SampleResponse, "latents")(z)))
    assert not reply.HasField("images")
    np.testing.assert_array_equal(from_tensor(reply.latents), z)


@pytest.mark.parametrize(("message", "name", "kind"), [
    (vae_pb2.SampleChunk, "images", UIntField),  # a Tensor, not an integer
    (vae_pb2.SampleChunk, "offset", TensorField),  # an integer, not a Tensor
    (vae_pb2.LogLikelihoodResponse, "elbo", UIntField),  # repeated
    (vae_pb2.DecodeResponse, "pixels", TensorField),  # no such field
    (vae_pb2.Tensor, "dtype", UIntField),  # an enum
])
def test_a_field_of_another_type_is_refused_when_declared(message, name, kind):
    with pytest.raises(TypeError):
        kind(message, name)


def test_an_array_without_a_wire_dtype_is_refused():
    with pytest.raises(TensorError, match="float64"):
        TensorField(vae_pb2.DecodeResponse, "images")(np.zeros(3, np.float64))


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (vae_pb2.Tensor(dtype=7, shape=[1], data=b"\0" * 4), "not FLOAT32"),
        (vae_pb2.Tensor(dtype=vae_pb2.FLOAT32, shape=[-1, -4], data=b"\0" * 16), "negative"),
        (vae_pb2.Tensor(dtype=vae_pb2.FLOAT32, shape=[2, 3], data=b"\0" * 20), "needs 24"),
        (vae_pb2.Tensor(dtype=vae_pb2.UINT8, shape=[2**40, 2**40], data=b""), "needs"),
        (vae_pb2.Tensor(dtype=vae_pb2.UINT8, shape=[1] * 65, data=b"\0"), "at most 32"),
        (vae_pb2.Tensor(dtype=vae_pb2.UINT8, shape=[0, 2**63 - 1, 2], data=b""), "too large"),
    ],
)
def test_from_tensor_refuses_inconsistent_tensors(tensor, message):
    with pytest.raises(TensorError, match=message):
        from_tensor(tensor, "z")


def test_too_many_dimensions_are_refused_before_the_shape_is_copied():
    """Before: the shape was copied whole first, and a Decode of 16M dimensions (a 15 MiB
    message) held the server's event loop a second for its refusal."""

    class Shape:  # a repeated field of a billion dimensions, as a message can carry
        def __len__(self) -> int:
            return 10**9

        def __iter__(self):
            raise AssertionError("the shape was copied")

    class Message:
        dtype, shape, data = vae_pb2.FLOAT32, Shape(), b""

    with pytest.raises(TensorError, match="1000000000 dimensions; at most 32"):
        from_tensor(Message(), "z")  # type: ignore[arg-type]


def test_images_out_shapes_and_rounds_as_round_255x_without_touching_its_input() -> None:
    from vae_server.images import images_out

    rng = np.random.default_rng(3)
    # Every level, the halfway points between levels, and random values.
    x = np.concatenate([np.arange(256, dtype=np.float32) / 255,
                        (np.arange(255, dtype=np.float32) + 0.5) / 255,
                        rng.random(784 * 4 - 511, dtype=np.float32)]).reshape(4, 784)
    before = x.copy()
    u = images_out(x, vae_pb2.UINT8)
    assert u.dtype == np.uint8 and u.shape == (4, 28, 28)
    np.testing.assert_array_equal(u.reshape(4, 784),
                                  np.rint(x * np.float32(255.0)).astype(np.uint8))
    np.testing.assert_array_equal(x, before)
    f = images_out(x, vae_pb2.FLOAT32)
    assert f.dtype == np.float32 and f.shape == (4, 28, 28)
    np.testing.assert_array_equal(f.reshape(4, 784), x)
