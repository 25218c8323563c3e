# The synpref image: Ray 2.60 on Python 3.11, the exact versions of requirements.lock, this
# package and its configs. CPU by default (what the manifests under cluster/ name):
#
#   docker build -t synpref:0.1.0 .
#
# GPU workers (vLLM judges, GPU training and scoring): the CUDA base image, torch from the
# CUDA index and the gpu extra (vLLM), at the same lock:
#
#   docker build -t synpref:0.1.0-gpu \
#       --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#       --build-arg EXTRAS=gpu .
#
# docs/operations.md: building, pushing and deploying it.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311
FROM ${RAY_IMAGE}

# torch==2.13.0 from PyPI is a CUDA build of several GB: the CPU image takes the CPU wheel.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=""

WORKDIR /home/ray/synpref
# Dependencies first (a layer that changes with the lock only), then the code.
COPY --chown=ray:users pyproject.toml requirements.lock README.md ./
COPY --chown=ray:users storage_schemas ./storage_schemas
COPY --chown=ray:users pipelines ./pipelines
COPY --chown=ray:users ray_jobs ./ray_jobs
COPY --chown=ray:users configs ./configs
COPY --chown=ray:users cluster ./cluster
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX}" \
        -c requirements.lock ".${EXTRAS:+[${EXTRAS}]}" \
    && python -c "import pipelines, ray_jobs.cli, storage_schemas"

# Models come from the image, a mounted volume or object storage, never from a hub at run time.
ENV HF_HUB_OFFLINE=1 \
    SYNPREF_LOG_FILE=/tmp/synpref.log
