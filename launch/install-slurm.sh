#!/usr/bin/env bash
# Installs what tests/test_slurm.py starts a real SLURM cluster from: Debian's munge, slurmctld,
# slurmd and slurm-client packages. Needs root (or sudo) and apt; does nothing if they are there.
set -euo pipefail

packages=(munge slurmctld slurmd slurm-client)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install-slurm: ${packages[*]} already installed ($(slurmd -V))"
    exit 0
fi
command -v apt-get >/dev/null || { echo "install-slurm: error: apt-get not found; install ${missing[*]} yourself" >&2; exit 1; }
sudo=()
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "install-slurm: error: installing ${missing[*]} needs root" >&2; exit 1; }
    sudo=(sudo)
fi
echo "install-slurm: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-slurm: done ($(slurmd -V))"
