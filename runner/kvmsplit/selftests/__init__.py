"""The kernel's own KVM selftests (tools/testing/selftests/kvm) as kvmsplit
scenarios: built from a kernel tree into the cache (build), chosen and sized
by kselftests/manifest.toml (manifest), run one by one under the kernel-log
guard (process, runner), and judged from what they print (ktap, parse,
verdict) into the same results.json as `kvmsplit run`. The command line is
in cli."""
