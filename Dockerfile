# CrossDNA for GPU nodes: CUDA runtime, the pinned GPU dependency set, a non-root user, `crossdna` as entrypoint.
#
#   docker build -t crossdna:0.1.0 .
#   docker run --rm --gpus all crossdna:0.1.0 doctor
#   docker run --rm --gpus all -v "$PWD/runs:/work/runs" -v /data/shards:/data/shards crossdna:0.1.0 \
#       shard stats /data/shards
#
# The pins repeat requirements/gpu.txt (torch) and setup.cfg (the [gpu] extra and install_requires), so that the
# dependency layers are cached apart from the source; tests/test_packaging.py keeps them in agreement.
# torch's CUDA wheels bring their own CUDA libraries, so the base only needs to match the driver generation.
ARG CUDA_BASE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
FROM ${CUDA_BASE}

ENV DEBIAN_FRONTEND=noninteractive \
    CUDA_HOME=/usr/local/cuda \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/cuda/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Triton compiles a small launcher with the system C compiler against the Python headers at run time, and
# tilelang (below) compiles its kernels with nvcc: the runtime base has neither, so add the compiler and the CUDA
# headers of the base's own CUDA version (CUDA_VERSION is set by the nvidia/cuda images), not the whole devel image.
RUN cuda=${CUDA_VERSION%.*} && cuda=${cuda/./-} \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev gcc g++ libc6-dev \
        "cuda-nvcc-$cuda" "cuda-cudart-dev-$cuda" \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv "$VIRTUAL_ENV"

# torch first and alone: its CUDA build pins its own triton (3.6.0 for torch 2.11.0), which nothing after it
# may replace (a bare "triton" or fla-core[cuda] would).
RUN pip install torch==2.11.0

RUN pip install \
        deepspeed==0.19.8 \
        fla-core==0.6.0 \
        flash-linear-attention==0.6.0 \
        transformers==5.23.0 \
        mlflow==3.17.2 \
        nvidia-ml-py==13.615.71 \
        "psutil>=5.9" \
        "matplotlib>=3.8" \
        "numpy>=1.26" \
        "pyyaml>=6" \
        "tqdm>=4.66" \
        "safetensors>=0.4" \
        webdataset==1.0.2 \
        pyfaidx==0.9.2.2 \
        isal==1.9.1

# fla 0.6.0 computes wrong gated-chunk gradients on Hopper with Triton >= 3.4, < 3.7.1 (fla #640) and routes that
# kernel to tilelang when it is installed; torch 2.11.0's triton 3.6.0 is in that range. crossdna.ops.fused and
# `crossdna doctor` check the combination (docs/troubleshooting.md).
RUN pip install \
        tilelang==0.1.15 \
        apache-tvm-ffi==0.1.12 \
        torch-c-dlpack-ext==0.1.5 \
        z3-solver==4.15.4.0

WORKDIR /opt/crossdna
COPY setup.cfg pyproject.toml README.md ./
COPY crossdna ./crossdna
COPY sharding ./sharding
COPY launcher ./launcher
COPY configs ./configs
COPY slurm ./slurm
# --no-deps: every dependency is pinned above; `pip check` fails the build if one is missing or conflicts.
RUN pip install --no-deps . && pip check

RUN useradd --create-home --uid 1000 --user-group --shell /bin/bash crossdna \
    && mkdir -p /work/runs && chown crossdna:crossdna /work/runs
# Numeric, so that runtimes which check "non-root" without the image's /etc/passwd (Kubernetes) accept it.
USER 1000:1000
WORKDIR /work
# Node-local caches for Triton's and DeepSpeed's JIT builds (slurm/common.sh sets the same on clusters).
ENV TRITON_CACHE_DIR=/tmp/triton \
    TORCH_EXTENSIONS_DIR=/tmp/torch_extensions \
    CROSSDNA_HOME=/opt/crossdna

ENTRYPOINT ["crossdna"]
CMD ["--help"]
