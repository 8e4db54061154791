"""Training, ONNX export and evaluation of the MNIST VAE: what needs torch or onnx.

What the server and the client share with it (the likelihood math, the manifest, the ONNX
model wrapper, IDX parsing) lives in the torch-free `vae_core`.
"""

from vae_core.host import no_onnxruntime_telemetry

no_onnxruntime_telemetry()  # before onnx_export imports onnxruntime
