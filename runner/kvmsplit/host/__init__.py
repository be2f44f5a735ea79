"""The host under test: the facts that decide what to expect (facts), and the
changes kvmsplit makes to it and puts back (changes)."""
