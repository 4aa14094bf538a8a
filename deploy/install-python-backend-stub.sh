#!/usr/bin/env bash
# Puts the nvidia-pytriton wheel's Python-backend stub for one Python version into a Triton backend
# directory, with the renamed libraries it links (auditwheel renamed them, e.g. libcudart-<hash>.so.12),
# then checks that every library the stub needs is found. Used by the Dockerfile; runnable anywhere.
#   install-python-backend-stub.sh PYTRITON_DIR PYTHON_VERSION BACKEND_DIR LIB_DIR
# PYTRITON_DIR: where `pip install --target` put nvidia-pytriton; BACKEND_DIR: the Python backend's
# directory (it holds libtriton_python.so); LIB_DIR: where the stub's libraries go (put it on the
# dynamic linker's path: ld.so.conf.d or LD_LIBRARY_PATH).
set -euo pipefail
if [ $# -ne 4 ]; then
  echo "usage: $0 PYTRITON_DIR PYTHON_VERSION BACKEND_DIR LIB_DIR" >&2
  exit 64
fi
pytriton_dir=$1 version=$2 backend_dir=$3 lib_dir=$4
stub="${pytriton_dir}/pytriton/tritonserver/python_backend_stubs/${version}/triton_python_backend_stub"
if [ ! -x "${stub}" ]; then
  echo "error: nvidia-pytriton in ${pytriton_dir} has no Python-backend stub for Python ${version}" \
    "(it has: $(ls "${pytriton_dir}/pytriton/tritonserver/python_backend_stubs" 2>/dev/null | tr '\n' ' '))" >&2
  exit 1
fi
mkdir -p "${lib_dir}"
# The wheel's own libraries the stub links (ldd resolves them through the stub's RPATH in the wheel).
ldd "${stub}" | awk '$3 ~ /nvidia_pytriton\.libs/ {print $3}' | while read -r library; do
  cp "${library}" "${lib_dir}/"
done
install -m 0755 "${stub}" "${backend_dir}/triton_python_backend_stub"
missing=$(LD_LIBRARY_PATH="${lib_dir}" ldd "${backend_dir}/triton_python_backend_stub" | grep 'not found' || true)
if [ -n "${missing}" ]; then
  echo "error: the Python ${version} stub cannot load:" >&2
  echo "${missing}" >&2
  exit 1
fi
echo "Python ${version} backend stub installed in ${backend_dir} (libraries in ${lib_dir})"
