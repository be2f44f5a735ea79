"""kvmsplit on other machines over SSH (paramiko): an inventory of boxes,
a kvmsplit run on several at once with its results fetched back, and
switching a box to a kernel under test."""
