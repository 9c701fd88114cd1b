# Two images from one file. `gateway` (the default, last stage): the gateway, its provisioning
# commands and the compose init steps, without the simulator or its dependencies. `sim`: the
# simulated clinic (python -m device_sim) with its scenario, live-view and plot libraries.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the package needs (keeps a local .venv or test data out of the image).
COPY pyproject.toml README.md* ./
COPY gateway ./gateway

FROM base AS sim
COPY device_sim ./device_sim
RUN pip install ".[sim]" && rm -rf /src/build
WORKDIR /app
CMD ["python", "-m", "device_sim", "--help"]

FROM base AS gateway
RUN pip install . && rm -rf /src/build
WORKDIR /app
EXPOSE 8080
CMD ["python", "-m", "gateway"]
