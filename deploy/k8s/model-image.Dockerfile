# The model as an OCI image, for the image-volume model source (components/model-image):
#   docker build -f deploy/k8s/model-image.Dockerfile -t REGISTRY/sepconv-model:TAG artifacts/
# Nothing runs from it; the kubelet mounts its files read-only at /models in the API pods.
FROM scratch
COPY model.onnx model_card.json /
