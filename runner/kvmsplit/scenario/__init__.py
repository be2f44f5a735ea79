"""kvmsplit's own scenarios on /dev/kvm: what a scenario is (model), what it
should show on this host (expectation), running its phases into an
Observations record (engine), and judging that record (verdict)."""
