#!/bin/sh
# SeaweedFS all-in-one (master + volume + filer + S3 gateway) with one S3 identity whose keys come from the
# environment (S3_ACCESS_KEY / S3_SECRET_KEY, set from .env); creates the buckets in S3_BUCKETS.
set -eu
: "${S3_ACCESS_KEY:?S3_ACCESS_KEY is not set (see .env.example)}"
: "${S3_SECRET_KEY:?S3_SECRET_KEY is not set (see .env.example)}"
umask 077
mkdir -p /tmp/seaweedfs
cat > /tmp/seaweedfs/s3.json <<JSON
{"identities": [{"name": "kimivl",
  "credentials": [{"accessKey": "${S3_ACCESS_KEY}", "secretKey": "${S3_SECRET_KEY}"}],
  "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
JSON
exec weed mini -dir=/data -ip="${SEAWEEDFS_IP:-seaweedfs}" -ip.bind=0.0.0.0 -master.telemetry=false \
  -admin.ui=false -s3.port=8333 -s3.config=/tmp/seaweedfs/s3.json -bucket="${S3_BUCKETS:-mlflow,kimivl}"
