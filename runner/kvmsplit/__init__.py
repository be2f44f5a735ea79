"""kvmsplit: a real-hardware test runner for KVM dirty logging and huge-page splitting."""
__version__ = "0.2.0"
