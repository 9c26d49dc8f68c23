#!/bin/sh
# Seeds the `parse` fuzz corpus with the RFC 4475 and RFC 5118 torture
# messages from the shared conformance set (../shared/conformance, relative
# to the repository root). The corpus directory is git-ignored.
#
# Usage: sip/fuzz/seed.sh            (from anywhere)
#        SIP_CONFORMANCE=/path/to/conformance sip/fuzz/seed.sh
set -eu

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
src="${SIP_CONFORMANCE:-$root/../shared/conformance}"
dst="$here/corpus/parse"

mkdir -p "$dst"
n=0
for f in "$src"/rfc4475/*.dat "$src"/rfc5118/*.dat; do
    [ -f "$f" ] || continue
    set_name="$(basename "$(dirname "$f")")"
    cp "$f" "$dst/$set_name-$(basename "$f")"
    n=$((n + 1))
done
if [ "$n" -eq 0 ]; then
    echo "seed.sh: no .dat files under $src/rfc4475 or $src/rfc5118" >&2
    exit 1
fi
echo "seed.sh: $n seeds in $dst"
