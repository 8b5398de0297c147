#!/usr/bin/env bash
# The third-party DICOM tools the tests check the platform against (Debian packages):
# Orthanc (a real PACS), DCMTK (storescu/echoscu/dsrdump/dsr2xml) and dicom3tools (dciodvfy,
# dcentvfy). Idempotent; needs root (CI runs as root). The package's own Orthanc service is not
# started: the tests start their own Orthanc on loopback with a temporary configuration.
set -euo pipefail
need=()
for pair in orthanc:Orthanc dcmtk:storescu dcmtk:dsrdump dicom3tools:dciodvfy; do
  command -v "${pair#*:}" > /dev/null || need+=("${pair%%:*}")
done
[ "${#need[@]}" = 0 ] && { echo "DICOM tools present"; exit 0; }
if [ "$(id -u)" != 0 ]; then
  echo "install-dicom-tools.sh: missing ${need[*]}; run as root or apt-get install them" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -q --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u)
