#!/usr/bin/env bash
# Prepare a TPU VM worker for mtj: JAX for TPU, this package, and the environment.
# Run on every worker of a pod slice, e.g.
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command "git clone REPO mtj && bash mtj/tpu_setup.sh"
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv "${MTJ_VENV:-$HOME/mtj-venv}"
. "${MTJ_VENV:-$HOME/mtj-venv}/bin/activate"
pip install -q --upgrade pip
pip install -q "jax[tpu]" -e ".[plots,tensorboard,zstd]"  # + eval, tfds: the harness, tfds: data (see README)
# Large checkpoints: let Orbax use many threads; keep XLA's TPU defaults.
grep -q MTJ_VENV "$HOME/.bashrc" 2>/dev/null || cat >> "$HOME/.bashrc" <<RC
export MTJ_VENV="${MTJ_VENV:-$HOME/mtj-venv}"
. "\$MTJ_VENV/bin/activate"
RC
python -c "import jax; print('jax', jax.__version__, 'devices:', jax.device_count(), 'local:', jax.local_device_count())"
