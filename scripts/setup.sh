#!/usr/bin/env bash
# Prepares a Debian 12 machine to build, run and test strait. Idempotent: run it as often as
# you like; it installs only what is missing. Needs root (packages, bpffs mount).
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "setup.sh: run as root (it installs packages and mounts the bpf filesystem)" >&2
  exit 1
fi

# LLVM 22 matches the nightly rustc that builds the eBPF programs (bpf-linker links with it);
# protoc builds the gRPC code; the rest are the tools the lab, the tests and the benchmarks use.
packages=(
  llvm-22-dev libpolly-22-dev zlib1g-dev libzstd-dev protobuf-compiler
  iproute2 nftables iptables etcd-server bpftool containernetworking-plugins iperf3 conntrack
)
missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The eBPF programs build with nightly and its standard library sources.
if ! rustup toolchain list | grep -q '^nightly'; then
  rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
  rustup component add rust-src --toolchain nightly
fi
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v bpf-linker >/dev/null; then
  echo "setup.sh: building bpf-linker 0.13 against LLVM 22 (a few minutes, once)"
  LLVM_PREFIX=/usr/lib/llvm-22 LLVM_SYS_221_PREFIX=/usr/lib/llvm-22 \
    cargo install bpf-linker@0.13.0 --locked --no-default-features --features llvm-22
fi

# Pins live on the bpf filesystem; it is not mounted on every fresh machine.
if ! grep -qs ' /sys/fs/bpf bpf ' /proc/mounts; then
  mount -t bpf bpf /sys/fs/bpf
fi

# cgroup v2 is where strait puts its processes (never the root cgroup).
if ! grep -q ' - cgroup2 ' /proc/self/mountinfo; then
  echo "setup.sh: no cgroup v2 hierarchy is mounted; strait needs one" >&2
  exit 1
fi
