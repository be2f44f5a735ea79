"""Building the selftests: what is and is not a kernel tree, a failed build
(the real compiler's first error), the cache, and the real Debian tree."""
import os

import pytest

from kvmsplit.errors import BadInputError, NoInputError, UnavailableError
from kvmsplit.selftests import build as b

# A tree that has what build() looks for, with make rules that do what the
# kernel's do in miniature: uapi headers into $(O)/usr/include (refused, as
# kbuild does, in a tree configured in-tree), binaries built against them
# into $(OUTPUT).
FAKE_TOP = """VERSION = 6
PATCHLEVEL = 99
SUBLEVEL = 0
EXTRAVERSION = -fake
headers:
\ttest -z "$(O)" -o ! -e .config || { echo "The source tree is not clean"; exit 1; }
\tmkdir -p $(or $(O),.)/usr/include/linux
\techo "#define FAKE_UAPI 0" > $(or $(O),.)/usr/include/linux/fake.h
"""
FAKE_KVM = """all:
\tmkdir -p $(OUTPUT)
\tgcc $(KHDR_INCLUDES) -c stats.c -o $(OUTPUT)/stats.o
\tgcc $(OUTPUT)/stats.o -o $(OUTPUT)/kvm_binary_stats_test
"""
GOOD_C = "#include <linux/fake.h>\nint main(void) { return FAKE_UAPI; }\n"


def fake_tree(root, source=GOOD_C):
    kvm = root / b.SELFTESTS
    kvm.mkdir(parents=True)
    (root / "Makefile").write_text(FAKE_TOP)
    (kvm / "Makefile").write_text(FAKE_KVM)
    (kvm / "stats.c").write_text(source)
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMSPLIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_missing_path(tmp_path):
    with pytest.raises(NoInputError, match="nowhere: no such file or directory"):
        b.build(tmp_path / "nowhere")


@pytest.mark.parametrize("files, message", [
    ({}, "not a kernel source tree (no Makefile)"),
    ({"Makefile": "all:\n"}, "not a kernel source tree (its Makefile has no VERSION/PATCHLEVEL)"),
    ({"Makefile": FAKE_TOP}, f"not a kernel source tree with KVM selftests (no {b.SELFTESTS}/Makefile)"),
])
def test_not_a_kernel_tree(tmp_path, cache, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(BadInputError) as e:
        b.build(tmp_path)
    assert str(e.value) == f"{tmp_path}: {message}"


def test_a_file_that_is_no_tarball(tmp_path, cache):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(BadInputError, match="notes.txt: neither a kernel source tree nor a source tarball"):
        b.build(f)


def test_a_broken_tarball(tmp_path, cache):
    f = tmp_path / "linux-source-6.12.tar.xz"
    f.write_bytes(b"not xz at all")
    with pytest.raises(BadInputError, match=r"linux-source-6.12.tar.xz: cannot extract: .+"):
        b.build(f)
    assert not list((cache / "selftests" / "src").glob("linux-source-6.12-*/*")), "no half extraction kept"


def test_failed_build_shows_the_compilers_first_error(tmp_path, cache):
    tree = fake_tree(tmp_path / "linux", "int main(void) {\n\treturn undeclared_one + undeclared_two;\n}\n")
    with pytest.raises(UnavailableError) as e:
        b.build(tree)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"building the KVM selftests failed in make -C {b.SELFTESTS}: "
                          "stats.c:2:16: error: 'undeclared_one' undeclared")
    assert "undeclared_two" not in msg
    assert msg.endswith("build.log)")


def test_first_error_without_a_compiler_error():
    log = "make: Entering directory '/x'\n/bin/sh: 1: gcc: not found\nmake: *** [Makefile:2: all] Error 127\n"
    assert b.first_error(log) == "/bin/sh: 1: gcc: not found"


def test_cache_hit_and_rebuild_after_a_change(tmp_path, cache):
    tree = fake_tree(tmp_path / "linux")
    first = b.build(tree)
    assert (first.cached, first.version) == (False, "6.99.0-fake")
    assert first.binary("kvm_binary_stats_test").is_file()
    assert first.directory.parent == cache / "selftests" / "build"
    assert b.build(tree).cached
    src = tree / b.SELFTESTS / "stats.c"
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = b.build(tree)
    assert not again.cached and again.directory == first.directory
    assert b.build(tree).cached
    assert not b.build(tree, force=True).cached
    assert not (tree / "usr").exists(), "a clean tree is not written to"


def test_a_tree_configured_in_tree_gets_its_headers_in_tree(tmp_path, cache):
    tree = fake_tree(tmp_path / "linux")
    (tree / ".config").write_text("CONFIG_KVM=y\n")
    built = b.build(tree)
    assert built.binary("kvm_binary_stats_test").is_file()
    assert (tree / "usr" / "include" / "linux" / "fake.h").is_file()


def test_default_source_prefers_the_newest_and_an_extracted_tree(tmp_path, monkeypatch):
    monkeypatch.setattr(b, "DEBIAN_SOURCES", tmp_path)
    with pytest.raises(NoInputError, match="apt-get install linux-source"):
        b.default_source()
    (tmp_path / "linux-source-6.1.tar.xz").touch()
    (tmp_path / "linux-source-6.12.tar.xz").touch()
    assert b.default_source() == tmp_path / "linux-source-6.12.tar.xz"
    (tmp_path / "linux-source-6.12").mkdir()
    assert b.default_source() == tmp_path / "linux-source-6.12.tar.xz", "a directory without a Makefile"
    (tmp_path / "linux-source-6.12" / "Makefile").touch()
    assert b.default_source() == tmp_path / "linux-source-6.12"


def test_the_debian_tree_builds_and_is_cached(selftests_build):
    bld = selftests_build
    assert bld.version.startswith("6.12.")
    for test in ("dirty_log_test", "dirty_log_perf_test", "x86_64/dirty_log_page_splitting_test",
                 "x86_64/vmx_dirty_log_test", "kvm_binary_stats_test"):
        assert os.access(bld.binary(test), os.X_OK), test
    again = b.build(bld.source)
    assert again.cached and again.directory == bld.directory
