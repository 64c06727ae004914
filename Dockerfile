# A fer-search worker: the package and its PostgreSQL driver on a pinned CUDA PyTorch image, whose
# torch and torchvision already satisfy setup.cfg (pip keeps them).
FROM pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/fer-search
COPY pyproject.toml setup.cfg ./
COPY fer_search ./fer_search
RUN pip install ".[postgres]" && fer-search --version

# The mount points of docker-compose.yml's volumes (see deploy/search.fleet.toml).
RUN mkdir -p /data /cache /artifacts /etc/fer-search

ENTRYPOINT ["fer-search"]
CMD ["--help"]
