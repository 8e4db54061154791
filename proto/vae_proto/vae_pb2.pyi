from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    UINT8: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
UINT8: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("images", "sample", "seed", "offset", "model_version")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    images: Tensor
    sample: bool
    seed: int
    offset: int
    model_version: str
    def __init__(self, images: _Optional[_Union[Tensor, _Mapping]] = ..., sample: _Optional[bool] = ..., seed: _Optional[int] = ..., offset: _Optional[int] = ..., model_version: _Optional[str] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("mu", "logvar", "z")
    MU_FIELD_NUMBER: _ClassVar[int]
    LOGVAR_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    mu: Tensor
    logvar: Tensor
    z: Tensor
    def __init__(self, mu: _Optional[_Union[Tensor, _Mapping]] = ..., logvar: _Optional[_Union[Tensor, _Mapping]] = ..., z: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("z", "output_dtype", "model_version")
    Z_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    z: Tensor
    output_dtype: DType
    model_version: str
    def __init__(self, z: _Optional[_Union[Tensor, _Mapping]] = ..., output_dtype: _Optional[_Union[DType, str]] = ..., model_version: _Optional[str] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: Tensor
    def __init__(self, images: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("n", "seed", "output_dtype", "return_latents", "digit", "model_version")
    N_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    RETURN_LATENTS_FIELD_NUMBER: _ClassVar[int]
    DIGIT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    n: int
    seed: int
    output_dtype: DType
    return_latents: bool
    digit: int
    model_version: str
    def __init__(self, n: _Optional[int] = ..., seed: _Optional[int] = ..., output_dtype: _Optional[_Union[DType, str]] = ..., return_latents: _Optional[bool] = ..., digit: _Optional[int] = ..., model_version: _Optional[str] = ...) -> None: ...

class SampleResponse(_message.Message):
    __slots__ = ("images", "latents")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    images: Tensor
    latents: Tensor
    def __init__(self, images: _Optional[_Union[Tensor, _Mapping]] = ..., latents: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SampleStreamRequest(_message.Message):
    __slots__ = ("n", "seed", "chunk_size", "output_dtype", "offset", "digit", "model_version")
    N_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DIGIT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    n: int
    seed: int
    chunk_size: int
    output_dtype: DType
    offset: int
    digit: int
    model_version: str
    def __init__(self, n: _Optional[int] = ..., seed: _Optional[int] = ..., chunk_size: _Optional[int] = ..., output_dtype: _Optional[_Union[DType, str]] = ..., offset: _Optional[int] = ..., digit: _Optional[int] = ..., model_version: _Optional[str] = ...) -> None: ...

class SampleChunk(_message.Message):
    __slots__ = ("offset", "images")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    offset: int
    images: Tensor
    def __init__(self, offset: _Optional[int] = ..., images: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class LogLikelihoodRequest(_message.Message):
    __slots__ = ("images", "k", "seed", "offset", "model_version")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    images: Tensor
    k: int
    seed: int
    offset: int
    model_version: str
    def __init__(self, images: _Optional[_Union[Tensor, _Mapping]] = ..., k: _Optional[int] = ..., seed: _Optional[int] = ..., offset: _Optional[int] = ..., model_version: _Optional[str] = ...) -> None: ...

class LogLikelihoodResponse(_message.Message):
    __slots__ = ("elbo", "log_likelihood", "bits_per_dim", "percentile", "anomaly", "k")
    ELBO_FIELD_NUMBER: _ClassVar[int]
    LOG_LIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    BITS_PER_DIM_FIELD_NUMBER: _ClassVar[int]
    PERCENTILE_FIELD_NUMBER: _ClassVar[int]
    ANOMALY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    elbo: _containers.RepeatedScalarFieldContainer[float]
    log_likelihood: _containers.RepeatedScalarFieldContainer[float]
    bits_per_dim: _containers.RepeatedScalarFieldContainer[float]
    percentile: _containers.RepeatedScalarFieldContainer[float]
    anomaly: _containers.RepeatedScalarFieldContainer[bool]
    k: int
    def __init__(self, elbo: _Optional[_Iterable[float]] = ..., log_likelihood: _Optional[_Iterable[float]] = ..., bits_per_dim: _Optional[_Iterable[float]] = ..., percentile: _Optional[_Iterable[float]] = ..., anomaly: _Optional[_Iterable[bool]] = ..., k: _Optional[int] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BatchingInfo(_message.Message):
    __slots__ = ("enabled", "max_batch_size", "max_queue_images", "max_delay_ms")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    max_batch_size: int
    max_queue_images: int
    max_delay_ms: float
    def __init__(self, enabled: _Optional[bool] = ..., max_batch_size: _Optional[int] = ..., max_queue_images: _Optional[int] = ..., max_delay_ms: _Optional[float] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_images_per_request", "max_sample_n", "max_stream_n", "max_chunk_size", "default_chunk_size", "max_k", "max_message_bytes")
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLE_N_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAM_N_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_images_per_request: int
    max_sample_n: int
    max_stream_n: int
    max_chunk_size: int
    default_chunk_size: int
    max_k: int
    max_message_bytes: int
    def __init__(self, max_images_per_request: _Optional[int] = ..., max_sample_n: _Optional[int] = ..., max_stream_n: _Optional[int] = ..., max_chunk_size: _Optional[int] = ..., default_chunk_size: _Optional[int] = ..., max_k: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_version", "latent_dim", "likelihood", "sigma", "image_shape", "execution_provider", "batching", "limits", "anomaly_percentile", "manifest_json", "digits")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LATENT_DIM_FIELD_NUMBER: _ClassVar[int]
    LIKELIHOOD_FIELD_NUMBER: _ClassVar[int]
    SIGMA_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    ANOMALY_PERCENTILE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    DIGITS_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    latent_dim: int
    likelihood: str
    sigma: float
    image_shape: _containers.RepeatedScalarFieldContainer[int]
    execution_provider: str
    batching: BatchingInfo
    limits: Limits
    anomaly_percentile: float
    manifest_json: str
    digits: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model_version: _Optional[str] = ..., latent_dim: _Optional[int] = ..., likelihood: _Optional[str] = ..., sigma: _Optional[float] = ..., image_shape: _Optional[_Iterable[int]] = ..., execution_provider: _Optional[str] = ..., batching: _Optional[_Union[BatchingInfo, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., anomaly_percentile: _Optional[float] = ..., manifest_json: _Optional[str] = ..., digits: _Optional[_Iterable[int]] = ...) -> None: ...
