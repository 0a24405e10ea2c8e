#!/usr/bin/env bash
# Prepare a fresh Debian machine for building and testing postcopy-broker.
# Idempotent: installs only what is missing. Needs root for apt and huge page reservation.
set -euo pipefail

need_pkgs=()
dpkg -s libclang-dev >/dev/null 2>&1 || need_pkgs+=(libclang-dev)      # userfaultfd-sys runs bindgen
command -v qemu-storage-daemon >/dev/null 2>&1 || need_pkgs+=(qemu-utils) # real vhost-user-blk backend
command -v cc >/dev/null 2>&1 || need_pkgs+=(gcc)                          # builds the bench floor programs
command -v nm >/dev/null 2>&1 || need_pkgs+=(binutils)                     # tests/workspace.rs: the library's symbols per feature
command -v systemd-socket-activate >/dev/null 2>&1 || need_pkgs+=(systemd)  # tests/systemd.rs: socket activation as systemd does it
# DPDK as a real vhost-user-net backend (tests/dpdk.rs): dpdk-dev ships dpdk-testpmd; the vhost
# PMD and the ring mempool driver it loads are their own packages. Its dependencies' recommends
# (systemd and friends) are not needed, so DPDK goes in without them.
dpdk_pkgs=()
command -v dpdk-testpmd >/dev/null 2>&1 || dpdk_pkgs+=(dpdk-dev)
for p in librte-net-vhost23 librte-mempool-ring23; do
  dpkg -s "$p" >/dev/null 2>&1 || dpdk_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ] || [ ${#dpdk_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing packages ${need_pkgs[*]} ${dpdk_pkgs[*]}; run as root or: sudo apt-get install ${need_pkgs[*]} ${dpdk_pkgs[*]}" >&2
    exit 1
  fi
  echo "setup: installing ${need_pkgs[*]} ${dpdk_pkgs[*]}"
  apt-get update -qq
  if [ ${#need_pkgs[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  fi
  if [ ${#dpdk_pkgs[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${dpdk_pkgs[@]}" >/dev/null
  fi
fi

# Huge pages for the hugetlbfs blocks of the tests and the demo (2 MiB pages).
want=${POSTCOPY_HUGEPAGES:-384}
have=$(cat /proc/sys/vm/nr_hugepages)
if [ "$have" -lt "$want" ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "$want" > /proc/sys/vm/nr_hugepages || true
    echo "setup: reserved $(cat /proc/sys/vm/nr_hugepages) huge pages of 2 MiB"
  else
    echo "setup: only $have huge pages reserved; as root: echo $want > /proc/sys/vm/nr_hugepages" >&2
  fi
fi

if [ ! -r /dev/userfaultfd ] && [ "$(cat /proc/sys/vm/unprivileged_userfaultfd 2>/dev/null || echo 0)" != 1 ] && [ "$(id -u)" -ne 0 ]; then
  echo "setup: userfaultfd is not usable by this user; see 'postcopy-broker probe'" >&2
fi
