#!/bin/sh
# make-ramdisk.sh OUT.cpio.gz [KTAP_FILE]: the ramdisk kvmsplit-qemu-job.yaml
# boots, a gzipped newc initramfs with a static busybox (Debian:
# busybox-static) and, when given, KTAP_FILE as /kvmsplit.ktap for
# kvmsplit-ktap.yaml to report. Its /init links busybox's applets into /bin,
# mounts /proc, /sys, /dev and /tmp, and starts a root shell on the console,
# whose "/ # " prompt the job waits for; LAVA then adds its test overlay to
# the image (overlays: lava: true).
set -eu
out=${1:?usage: make-ramdisk.sh OUT.cpio.gz [KTAP_FILE]}
ktap=${2:-}
busybox=$(command -v busybox) || { echo "make-ramdisk: busybox not found (apt install busybox-static)" >&2; exit 1; }
if ldd "$busybox" >/dev/null 2>&1; then
    echo "make-ramdisk: $busybox is dynamically linked; the ramdisk needs busybox-static" >&2
    exit 1
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/dev" "$root/proc" "$root/sys" "$root/tmp" "$root/root" "$root/etc" "$root/usr"
ln -s bin "$root/sbin"
ln -s ../bin "$root/usr/bin"
ln -s ../bin "$root/usr/sbin"
cp "$busybox" "$root/bin/busybox"
cat >"$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
export HOME=/root PATH=/bin
echo "kvmsplit ramdisk on $(uname -r)"
exec setsid cttyhack sh -l
INIT
chmod 755 "$root/init"
[ -z "$ktap" ] || cp "$ktap" "$root/kvmsplit.ktap"
(cd "$root" && find . | cpio --quiet -o -H newc) | gzip -9 >"$out"
