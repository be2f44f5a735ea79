# A package, so that `from conftest import need` in here finds tests/conftest.py
# and not this directory's own conftest.py.
