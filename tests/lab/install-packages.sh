#!/usr/bin/env bash
# Install the Debian packages the nested lab and the 9p tests run on the host (as root).
#
#   qemu-system-x86   the L1 emulator (TCG with emulated SVM)
#   busybox-static    L1's and L2's whole userland (fetch-assets.sh takes it from the .deb)
#   xz-utils          fetch-assets.sh: unpack the kernel from the bzImage
#   binutils          fetch-assets.sh: objcopy reads module dependencies from .modinfo
#   diod              tests/tests/p9_server.rs: diodls, diodcat and diodload, real 9P2000.L
#                     clients for bulkhead-worker p9's debug transport
#   iproute2 procps   tests/tests/net_worker.rs and bench/net.sh: `ip netns`, `ip link`,
#                     `ip addr`, `ip neigh` and `sysctl` for each test's network namespace
#   libsdl2-dev       bulkhead-viewer (`--display sdl`) links the system's SDL2; its tests
#                     run it on SDL's offscreen video driver, so no X server is needed
#
# The trap: these machines ship qemu-utils 10 from backports, and bookworm's
# qemu-system-x86 7.2 breaks it. A plain `apt-get install qemu-system-x86 qemu-utils` fails
# ("held broken packages"), so ask for bookworm's qemu-utils explicitly and allow apt to
# downgrade; qemu-img 7.2 serves the project's other tests fine.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends --allow-downgrades \
    qemu-system-x86 qemu-utils/bookworm busybox-static xz-utils binutils diod \
    iproute2 procps libsdl2-dev
