# The model as a versioned artifact for Kubernetes (deploy/k8s): one exported model directory
# (encoder.onnx, decoder.onnx, prior.npz, manifest.json), which the server pods' init container
# copies into their model volume. Built from the repository root, tagged with the model version:
#   docker build -f deploy/docker/model.Dockerfile \
#     -t vae-serving-model:$(python -c 'import json; print(json.load(open("models/default/manifest.json"))["model_version"])') .
FROM busybox:1.36
# Readable by the init container's user whatever the umask the model was exported under (its
# files follow it: 0600 under 077, owned by root in the image, and the copy failed).
COPY --chmod=755 models/default /model
USER 10001
