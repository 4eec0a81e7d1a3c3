#!/usr/bin/env bash
# Pack an installed llama_cpp package (llama-cpp-python) with one copy of each library, to unpack into another
# node's site directory (same CPU and GPU architecture) instead of building llama.cpp there. The wheel holds every
# library three times (.so, .so.0, .so.0.x.y): a CUDA build for one architecture is 187 MB as a wheel, 31 MB packed.
# usage: scripts/llama_pack.sh SITE OUT.tar.gz        then elsewhere: tar xzf OUT.tar.gz -C OTHER_SITE
set -euo pipefail
site=${1:?usage: llama_pack.sh SITE OUT.tar.gz}
out=${2:?usage: llama_pack.sh SITE OUT.tar.gz}
[ -d "$site/llama_cpp/lib" ] || { echo "llama_pack: no llama_cpp/lib under $site" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -a "$site/llama_cpp" "$tmp/"
# each library once under its plain name; its SONAME (what the other libraries and the loader ask for) is a link
for f in "$tmp"/llama_cpp/lib/*.so; do
  soname=$(readelf -d "$f" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
  rm -f "$f".[0-9]*
  if [ -n "$soname" ] && [ "$soname" != "$(basename "$f")" ]; then ln -s "$(basename "$f")" "$(dirname "$f")/$soname"; fi
done
find "$tmp/llama_cpp" -name __pycache__ -prune -exec rm -rf {} +
tar czf "$out" -C "$tmp" llama_cpp
echo "llama_pack: $out ($(du -h "$out" | cut -f1))"
