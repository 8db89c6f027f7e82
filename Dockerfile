# intraq-pipeline image for Ray clusters (clusters/gpu.yaml runs every node in it).
#
# Build and push (replace ACCOUNT/REGION; the tag follows the version in pyproject.toml):
#   docker build -t intraq-pipeline:0.1.0 .
#   aws ecr get-login-password --region REGION \
#     | docker login --username AWS --password-stdin ACCOUNT.dkr.ecr.REGION.amazonaws.com
#   docker tag intraq-pipeline:0.1.0 ACCOUNT.dkr.ecr.REGION.amazonaws.com/intraq-pipeline:0.1.0
#   docker push ACCOUNT.dkr.ecr.REGION.amazonaws.com/intraq-pipeline:0.1.0
#
# Base: the official Ray image for the Ray version we test against (2.60.0), Python 3.11, GPU
# flavour. Tag scheme: {ray version}-{pyXY}-{cpu|gpu|cuXXX}; "-gpu" aliases Ray's default CUDA
# build for that release. For byte-for-byte reproducible builds, pin the digest as well:
#   FROM rayproject/ray:2.60.0-py311-gpu@sha256:<digest from `docker pull`>
# The base image already runs as the unprivileged user "ray" (uid 1000, gid 100 "users",
# HOME=/home/ray, Python in /home/ray/anaconda3).
FROM rayproject/ray:2.60.0-py311-gpu

LABEL org.opencontainers.image.title="intraq-pipeline" \
      org.opencontainers.image.description="Data-free quantization of CNN classifiers on Ray" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /home/ray/intraq-pipeline

# Owned by the image user: setuptools writes build metadata next to the sources while installing.
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 intraq_core/ ./intraq_core/
COPY --chown=1000:100 pipeline/ ./pipeline/
COPY --chown=1000:100 configs/ ./configs/

# Install the project with every extra a CLI command imports (tune: optuna; report: matplotlib,
# scikit-learn; export: onnx, onnxruntime, onnxscript; timm: `--arch timm:<name>` teachers,
# which every node must be able to build). pyproject.toml pins Ray to the base
# image's version, so pip never swaps the Ray the cluster launcher and the image were built
# for. torch/torchvision come from PyPI's CUDA wheels. ("./[...]" is "." with extras.)
RUN pip install --no-cache-dir "./[tune,report,export,timm]" \
    && rm -rf build ./*.egg-info

# Stay the base image's unprivileged user (ray:users), spelled numerically for the host.
USER 1000:100
