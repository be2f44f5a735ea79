# A package, so that `from conftest import need` in here still finds
# tests/conftest.py and not tests/selftests/conftest.py.
