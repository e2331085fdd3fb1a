# lk-vllm image. CPU by default; `docker build --build-arg DEVICE=cuda .` builds on the official vLLM CUDA image.
# Both mirror `make setup` exactly: the image runs the same Makefile target a developer runs.
ARG DEVICE=cpu

FROM python:3.11-slim-bookworm AS base-cpu
ENV LK_MAKE_DEVICE=cpu VENV_ARGS=""
# libjemalloc2: the loss benchmark times under it (benchmarks/bench_losses.py --allocator), and CPU training with
# large batches can LD_PRELOAD it (README, "LK losses in your own trainer").
RUN apt-get update && apt-get install -y --no-install-recommends make gcc g++ libnuma1 libjemalloc2 \
    && rm -rf /var/lib/apt/lists/*

# The official image already carries vllm==0.32.0 and CUDA; the venv sees it through system site-packages.
FROM vllm/vllm-openai:v0.32.0 AS base-cuda
ENV LK_MAKE_DEVICE=gpu VENV_ARGS="--system-site-packages"
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*

FROM base-${DEVICE}
WORKDIR /opt/lk-vllm
COPY . .
# PIP_ARGS lets a CPU build find torch==2.13.0+cpu, e.g. --build-arg PIP_ARGS="--extra-index-url <torch cpu index>".
ARG PIP_ARGS=""
RUN make setup DEVICE=${LK_MAKE_DEVICE} VENV=/opt/lk-vllm/.venv VENV_ARGS="${VENV_ARGS}" PIP_ARGS="${PIP_ARGS}"
ENV PATH=/opt/lk-vllm/.venv/bin:$PATH \
    LK_VLLM_HOME=/data/lk-vllm \
    HF_HUB_OFFLINE=1
# Build the embedded default target into the image so `serve` starts without a conversion step.
ARG BUILD_DEFAULT_TARGET=1
RUN if [ "$BUILD_DEFAULT_TARGET" = "1" ]; then lk-vllm models; fi
VOLUME /data/lk-vllm
EXPOSE 8000
ENTRYPOINT ["lk-vllm"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
