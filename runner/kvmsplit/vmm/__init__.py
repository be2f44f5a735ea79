"""The VMM: the /dev/kvm ioctl layer (kvm/), guest memory backings, the
multiboot guest (guest/: its build, loader and line protocol) and the machine
that runs it with one thread per vCPU. Nothing here knows about scenarios or
verdicts."""
