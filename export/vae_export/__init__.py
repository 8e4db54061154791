"""Training, ONNX export and evaluation of the MNIST VAE: what needs torch or onnx.

What the server and the client share with it (the likelihood math, the manifest, the ONNX
model wrapper, IDX parsing) lives in the torch-free `vae_core`.
"""
