"""What a run leaves for people and CI: KTAP, JUnit, KCIDB, the kernel-log
excerpts, the HTML report, and the results schema they all read through."""
