"""Child of bench_bitmap_thp.py: boot the guest and print its first line.
The parent times this process from spawn to that line."""
from kvmsplit.vmm.guest.build import guest_image
from kvmsplit.vmm.kvm import Kvm
from kvmsplit.vmm.machine import Machine

m = Machine(Kvm(), nr_vcpus=1)
m.load(guest_image())
m.start()
print(m.expect(0, "HELLO", 10).text, flush=True)
m.close()
