#!/bin/sh
# PID 1 of the test guest (kernel init=): a minimal bring-up, then the agent in the foreground.
# No systemd: a direct script reaches the agent seconds sooner under TCG. When the agent ends,
# for whatever reason, the guest powers off so the host sees QEMU exit instead of a hang.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
say() { echo "virtio-emu-init: [$(cut -d" " -f1 /proc/uptime)] $*" > /dev/console; }

mnt() { mountpoint -q "$3" || mount -t "$1" "$2" "$3"; }
mnt proc proc /proc
mnt sysfs sysfs /sys
mnt devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mnt devpts devpts /dev/pts
mnt tmpfs tmpfs /dev/shm
mnt tmpfs tmpfs /run
mnt tmpfs tmpfs /tmp
hostname vguest

say "starting udev"
/usr/lib/systemd/systemd-udevd --daemon
udevadm trigger --action=add
udevadm settle --timeout=60
say "udev settled; starting agent"

python3 /usr/local/lib/virtio-emu/agent.py
say "agent exited with status $?; powering off"
# sysrq poweroff is asynchronous; PID 1 must not exit before it lands (that would panic). The
# sleep starts first: once the disk is shut down a new program cannot be loaded (I/O errors and
# segfaults on the console), while waiting for one already running is a shell builtin.
sleep infinity &
echo o > /proc/sysrq-trigger
while :; do wait; done
