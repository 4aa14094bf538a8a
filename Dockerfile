# syntax=docker/dockerfile:1
# peftserve's Triton image, built once (`docker compose build`, or deploy/gpu-startup-check.sh): every start
# afterwards only starts Triton. The model repository is not in the image: compose mounts it (writable, so
# `python -m tools publish` can add adapter versions).
#
# Why NVIDIA's 24.10 image with a Python 3.11 environment for the Python backend (and not 24.12+):
# - 24.10 ships tritonserver 2.51, the release every test here runs against (the nvidia-pytriton 0.7.0
#   wheel). The Python-backend behaviours the project relies on were measured on it (decoupled models,
#   explicit model control, restricted APIs, the generate extension, responses sent after execute()).
#   24.12 and later ship Ubuntu 24.04 / Python 3.12 and a newer Triton that nothing here tests.
# - 24.10's own Python is 3.10, and transformers 5.21+ needs 3.11. The project pins Python 3.11
#   (pyproject.toml). The engine therefore runs in a Python 3.11 virtual environment (Ubuntu 22.04's
#   python3.11 and libpython3.11), and the backend's stub is swapped for the Python 3.11 stub that the
#   nvidia-pytriton wheel ships: the very file `make serve` and the tests use, built for the same Python
#   backend release (r24.10) as the image's libtriton_python.so, GPU-enabled (links CUDA 12.6's cudart).
#   The stub embeds the first python3 on PATH, so the environment's bin/ goes first on PATH, as locally.
# - CUDA: the image is CUDA 12.6 (driver 560+, or data-center R470/R525/R535/R545 with forward
#   compatibility). torch comes as the cu128 build from PyTorch's index (CUDA 12.x runs on any driver of
#   the 12.x line through minor-version compatibility); PyPI's default torch 2.13.0 wheel is CUDA 13.0,
#   which needs driver 580+. Override with --build-arg TORCH_CUDA=cu126 where PyTorch offers it.
#
# The defaults below are read by `python -m tools.image_requirements` (run by `make test`), which resolves
# deploy/requirements-triton.txt for PYTHON_VERSION on this image's glibc without Docker.
ARG TRITON_RELEASE=24.10
ARG PYTHON_VERSION=3.11
ARG PYTRITON_VERSION=0.7.0
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu128

FROM nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3
ARG PYTHON_VERSION
ARG PYTRITON_VERSION
ARG TORCH_VERSION
ARG TORCH_CUDA

RUN apt-get update \
 && apt-get install -y --no-install-recommends "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-venv" \
      "libpython${PYTHON_VERSION}" \
 && rm -rf /var/lib/apt/lists/* \
 && "python${PYTHON_VERSION}" -m venv /opt/peftserve/venv
ENV PATH=/opt/peftserve/venv/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1

# The engine's dependencies: the layer that takes long (several GB of CUDA libraries), kept apart from the
# code so that a code change does not reinstall them.
COPY deploy/requirements-triton.txt /opt/peftserve/requirements-triton.txt
RUN pip install --no-cache-dir --upgrade pip \
 && pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" \
      --extra-index-url https://pypi.org/simple "torch==${TORCH_VERSION}+${TORCH_CUDA}" \
 && pip install --no-cache-dir -r /opt/peftserve/requirements-triton.txt \
 && pip check \
 && python -c "import torch; assert torch.version.cuda, 'torch is a CPU build'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

# The Python backend's stub for PYTHON_VERSION (and the renamed cudart it links), from nvidia-pytriton.
COPY deploy/install-python-backend-stub.sh /opt/peftserve/bin/
RUN pip install --no-cache-dir --no-deps --target /tmp/pytriton "nvidia-pytriton==${PYTRITON_VERSION}" \
 && /opt/peftserve/bin/install-python-backend-stub.sh /tmp/pytriton "${PYTHON_VERSION}" \
      /opt/tritonserver/backends/python /opt/peftserve/lib \
 && echo /opt/peftserve/lib > /etc/ld.so.conf.d/peftserve.conf && ldconfig \
 && rm -rf /tmp/pytriton

# The engine package itself (model_repository/*/1/model.py imports it).
COPY pyproject.toml README.md /opt/peftserve/src/
COPY peftserve /opt/peftserve/src/peftserve
RUN pip install --no-cache-dir --no-deps /opt/peftserve/src \
 && pip check \
 && cd / && python -c "import peft, transformers, peftserve.engine; print('engine importable')"

COPY deploy/triton-entrypoint.sh /opt/peftserve/bin/
ENV HF_HUB_OFFLINE=1
ENTRYPOINT ["/opt/peftserve/bin/triton-entrypoint.sh"]
