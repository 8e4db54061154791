"""What training, serving and the client share, without torch: the likelihood math
(`likelihood`), the model directory's manifest (`manifest`), the exported models under ONNX
Runtime (`onnx_model`), the IDX file format (`idx`), the rules for bearer tokens and PEM files
(`security`), a free loopback port (`ports`), the cores and BLAS threads the process uses
(`host`), and the prior p(z) (`prior`).

Nothing is imported here: `import vae_core` costs nothing, and only `onnx_model` needs
onnxruntime, so the client (which installs without it) imports the other modules freely.
"""
