#!/bin/bash
# Runs once, after the influxdb:2.x image's first-start setup (DOCKER_INFLUXDB_INIT_MODE=setup),
# from /docker-entrypoint-initdb.d. Maps the v1 database/retention policy `boots`/`autogen` to
# the initial bucket so the gateway's v1 /write and Grafana's InfluxQL queries work.
# The influx CLI is already configured with the admin token and host at this point.
set -euo pipefail

db="${INFLUX_V1_DATABASE:-boots}"
rp="${INFLUX_V1_RETENTION_POLICY:-autogen}"

influx v1 dbrp create \
  --org "${DOCKER_INFLUXDB_INIT_ORG}" \
  --bucket-id "${DOCKER_INFLUXDB_INIT_BUCKET_ID}" \
  --db "${db}" \
  --rp "${rp}" \
  --default

echo "dbrp ${db}/${rp} -> bucket ${DOCKER_INFLUXDB_INIT_BUCKET} (${DOCKER_INFLUXDB_INIT_BUCKET_ID})"
