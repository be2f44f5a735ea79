"""Child of run_all.py's start-up figure: start kvmsplit's guest under QEMU
(the QEMU backend's QemuVm: qemu-system-x86_64 -accel kvm, SeaBIOS, the same
multiboot guest) and print its first line. The parent times this process
from spawn to that line, as it does first_line.py for kvmsplit's own VMM."""
import sys
import tempfile
from pathlib import Path

from kvmsplit.vmm.guest.build import guest_image
from kvmsplit.vmm.memory import MB, Backing
from kvmsplit.vmm.qemu import QemuVm, Region, low_memory

with tempfile.TemporaryDirectory(prefix="kvmsplit-bench-qemu-") as d:
    vm = QemuVm(guest_image(), Path(d), Region(Backing.THP, 64 * MB), low_mem=low_memory(64 * MB, "2m"),
                cpu="qemu64,-pni")   # what the QEMU backend uses: -cpu host asks PVM for MSRs it refuses
    try:
        try:
            vm.start()
        except Exception:
            print(vm.stderr(), file=sys.stderr)
            raise
        print(vm.expect("HELLO", 60, "HELLO").text, flush=True)
    finally:
        vm.close()
sys.exit(0)
