#!/bin/busybox sh
# The tiny initrd's /init when `up --kernel` boots a user's kernel (testbed/kernel.py
# appends it, with that kernel's modules, to the image's initrd, where it replaces
# images/initrd/init: that one is part of the image's key, so it stays as it is).
# As images/initrd/init, plus: the modules tree given with --modules is a read-only
# virtio-9p share (mount tag beluga-modules) mounted at /lib/modules/<version> in the
# root before the hand-over, so the boot script's modprobe finds the CXL drivers of this
# kernel; and the kernel's version must be the folder's: a kernel that finds no modules
# of its own would boot without CXL and fail much later, less clearly.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() {
    echo "beluga: boot failed: $*"
    exec sh
}
while read -r m; do
    [ -n "$m" ] || continue
    insmod "/lib/modules/$m" || echo "initrd: insmod $m failed"
done < /modules.order
read -r release < /proc/sys/kernel/osrelease
want=
[ -r /modules.version ] && read -r want < /modules.version
if [ -n "$want" ] && [ "$want" != "$release" ]; then
    fail "the kernel is $release but the modules given (--modules) are for $want (lib/modules/$want)"
fi
root=/dev/vda
read -r cmdline < /proc/cmdline
for w in $cmdline; do
    case "$w" in root=*) root=${w#root=} ;; esac
done
i=0
while [ ! -b "$root" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
if ! mount -t ext4 -o rw "$root" /newroot; then
    fail "cannot mount $root (kernel $release: virtio_blk and ext4 built in, or in --modules?)"
fi
if [ -n "$want" ]; then
    mkdir -p "/newroot/lib/modules/$want"
    mount -t 9p -o trans=virtio,version=9p2000.L,ro beluga-modules "/newroot/lib/modules/$want" \
        || fail "cannot mount the modules share (tag beluga-modules) at /lib/modules/$want"
fi
mkdir -p /dev/pts /dev/shm  # mount points for the root's `mount -a`
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /usr/lib/beluga/init
