# Sourced at the start of a lent GPU machine's call (benchmarks/device_session.sh,
# recipes/offline_speech/gpu_session.sh): the machine has torch but no network, so the few pure-Python /
# manylinux dependencies it may lack (soundfile, soxr, cffi, pyyaml, tqdm; pytest for the CUDA tests) travel as
# wheels in .whl/:
#   pip download --only-binary=:all: --no-deps --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl soundfile soxr cffi pycparser pyyaml tqdm \
#       pytest pluggy iniconfig packaging
# Sets OUT (default /tmp/mossformer2_device), PYTHON (default python3) and PYTHONPATH (src/, then the wheels
# from $WHEELS, default .whl).
OUT=${OUT:-/tmp/mossformer2_device}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
