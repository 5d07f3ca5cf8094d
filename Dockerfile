# The image that jobs/kuberay/rayjob.yaml names: this repo, installed from its pyproject.toml.
#
#   docker build --build-arg VARIANT=cpu -t dpo-ray:0.1.0-cpu .     head, reference/generation pools
#   docker build --build-arg VARIANT=cuda -t dpo-ray:0.1.0-cuda .   GPU train workers
#
# VARIANT=cpu takes torch from PyTorch's CPU index: without it pip resolves torch to the CUDA build
# (several GB of CUDA libraries an image for CPU nodes never uses). VARIANT=cuda takes the PyPI
# wheel, which bundles its CUDA 12 libraries; the node's driver comes in through the NVIDIA
# container runtime, so both variants start from the same plain Python base.
# Tag and push to a registry the cluster pulls from, and put that name in the manifest (or, on a
# local kind cluster, `kind load docker-image dpo-ray:0.1.0-cpu dpo-ray:0.1.0-cuda`).
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
# Extras of pyproject.toml: demo = the main job's prompts and lexicon judges; trackers.
ARG EXTRAS=demo,mlflow,tensorboard
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 RAY_DATA_DISABLE_PROGRESS_BARS=1

# wget: KubeRay's exec health probes use it for Ray < 2.53 (ours get HTTP probes; kept for
# operators that still exec). Pods run as an unprivileged user, as Ray's own images do.
RUN apt-get update && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 ray

# torch first and pinned (as scripts/setup.sh does), so pyproject's `torch>=2.4` is already met.
RUN case "$VARIANT" in \
      cpu)  pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu ;; \
      cuda) pip install "torch==${TORCH_VERSION}" ;; \
      *)    echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 1 ;; \
    esac

WORKDIR /opt/dpo_ray
COPY pyproject.toml README.md ./
COPY dpo_ray ./dpo_ray
COPY jobs ./jobs
RUN pip install ".[${EXTRAS}]" && python -c "import dpo_ray, ray, torch; print('dpo_ray image:', ray.__version__, torch.__version__)"

USER ray
WORKDIR /home/ray
