#!/usr/bin/env bash
# Installs cnd_ray on a cluster node (every node, head and workers, of aws.yaml and onprem.yaml).
# Run by the launcher's setup_commands from the project folder that file_mounts copied to
# ~/cnd_ray. Idempotent: `ray up` reruns it on every node it (re)starts.
set -euo pipefail
cd ~/cnd_ray
# The torch build for this node's CUDA driver (CPU wheels where there is no GPU): pip's default
# index would pick a CUDA build that may not match the driver.
if command -v nvidia-smi >/dev/null 2>&1; then
  cuda=$(nvidia-smi | sed -n 's/.*CUDA Version: \([0-9]*\)\.\([0-9]*\).*/\1\2/p' | head -1)
  if [ "${cuda:-0}" -ge 128 ]; then index=cu128; elif [ "${cuda:-0}" -ge 126 ]; then index=cu126; else index=cu124; fi
else
  index=cpu
fi
pip install -q torch torchvision --index-url "https://download.pytorch.org/whl/${index}"
# The same Ray on every node as on the laptop that runs `ray up` (the image ships it; pin it anyway,
# so a node never upgrades itself to another Ray).
pip install -q -e ".[cluster]" "ray[default,train,tune,data]==2.60.0"
