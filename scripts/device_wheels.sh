#!/usr/bin/env bash
# The Python packages the device image lacks, as unpacked site folders under .whl/ (ignored; name the ones a call
# needs in `carry`, and scripts/device_env.sh puts each one present on PYTHONPATH). Run here, on a machine with the
# package index, never on the device:
#   scripts/device_wheels.sh
# .whl/peers (5 MB): bitsandbytes 0.50.2 with only its CPU and CUDA 13.0 libraries, gemlite 0.6.0.post2 (pure Python,
#   built from its sdist): the benchmark's peers and the GPU tests that compare against them.
# .whl/lab (25 MB): papermill and the Jupyter kernel stack that run the notebooks (`make reproduce`).
# Packages the device image already has (KINDS.md's list) are left out so that its versions stay, and so are the
# optional ones (jedi, debugpy: completion and the debugger, 60 MB of the 64 a call carries).
set -euo pipefail
platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
skip='attrs certifi charset_normalizer click idna jinja2 markupsafe numpy packaging psutil pygments python_dateutil
  pyyaml requests six torch tqdm typing_extensions urllib3 filelock fsspec networkx sympy mpmath setuptools triton
  nvidia_ cuda_bindings cuda_pathfinder tzdata jedi parso debugpy'

site() {  # site FOLDER WHEEL_DIR: unpack the wheels (cp312, x86-64) into .whl/FOLDER
  for name in $skip; do rm -f "$2/$name"*-*.whl; done
  rm -rf ".whl/$1"
  python3 -m pip install -q --no-deps --no-compile --target ".whl/$1" --python-version 3.12 --implementation cp \
    --only-binary=:all: "${platforms[@]}" "$2"/*.whl
  rm -rf "$2"
}

peers=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$peers" bitsandbytes==0.50.2
python3 -m pip download -q --no-deps --no-binary=:all: -d "$peers" gemlite==0.6.0.post2
python3 -m pip wheel -q --no-deps --no-build-isolation -w "$peers" "$peers"/gemlite-*.tar.gz
rm -f "$peers"/gemlite-*.tar.gz
site peers "$peers"
find .whl/peers/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda130.so' -delete

lab=$(mktemp -d)
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d "$lab" \
  papermill ipykernel ipywidgets nbformat nbclient
site lab "$lab"
rm -rf .whl/lab/share/jupyter/{labextensions,nbextensions}
du -sh .whl/*
