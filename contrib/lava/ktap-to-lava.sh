#!/bin/sh
# ktap-to-lava.sh FILE: report a KTAP file's top-level results as LAVA test
# cases, one lava-test-case call each: "ok N name" is a pass, "ok N name #
# SKIP ..." a skip, "not ok N name ..." a fail (kvmsplit's ERROR and
# UNCONFIRMED directives included: a CI box must not read them as passes).
# Subtest lines (indented) and diagnostics (#) are left to the log. A file
# with no result line at all (the producer died before its first result, or
# never ran) is one failed test case, "ktap-results", not a silent pass.
# POSIX sh and sed only: it runs in a busybox ramdisk as well as on Debian.
set -u
ktap=${1:?usage: ktap-to-lava.sh FILE.ktap}
results=$(sed -n -e 's/^ok [0-9][0-9]* \([^ #][^ ]*\) *# *SKIP.*/\1 skip/p' \
                 -e 's/^ok [0-9][0-9]* \([^ #][^ ]*\).*/\1 pass/p' \
                 -e 's/^not ok [0-9][0-9]* \([^ #][^ ]*\).*/\1 fail/p' "$ktap" 2>/dev/null)
if [ -z "$results" ]; then
    echo "ktap-to-lava: no KTAP result line in $ktap" >&2
    lava-test-case ktap-results --result fail
    exit 0
fi
echo "$results" | while read -r name result; do
    lava-test-case "$name" --result "$result"
done
