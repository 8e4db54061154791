"""Training, ONNX export and evaluation of the MNIST VAE.

This package's top level imports nothing heavy: `vae_export.likelihood` and
`vae_export.data` are numpy-only so that the server (which ships without PyTorch) can share
the likelihood math with the evaluator.
"""
