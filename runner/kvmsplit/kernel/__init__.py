"""The kernel under test: kernel source trees and the cache (source),
building a small KVM host kernel (build), and booting it to run kvmsplit
inside (vm)."""
