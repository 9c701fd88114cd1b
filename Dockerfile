# One image for the gateway (python -m gateway) and the simulator (python -m device_sim).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the package needs (keeps a local .venv or test data out of the image).
COPY pyproject.toml README.md* ./
COPY gateway ./gateway
COPY device_sim ./device_sim
RUN pip install . && rm -rf /src/build

WORKDIR /app
EXPOSE 8080
CMD ["python", "-m", "gateway"]
