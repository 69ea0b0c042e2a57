#!/usr/bin/env bash
# Run HERE (not on the device) before a session's device calls: gathers what the lent GPU machine lacks
# (../shared/device.md) into .gpu/, which git ignores and each `run` call carries:
#   .gpu/whl   wheels for its Python 3.12 (pydantic, fastapi/uvicorn, gguf, RE2, the test clients): ~8 MB
#   .gpu/data  the bundled corpora (../shared does not travel): ~9 MB
# Then, with the device tool: run(command="bash benchmarks/gpu/check.sh suite bench", carry=[".gpu"]).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
rm -rf .gpu/whl && mkdir -p .gpu/whl .gpu/data
pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .gpu/whl \
    "pydantic>=2.5" "fastapi>=0.110" "uvicorn>=0.29" "gguf>=0.10" "openai>=1.30" "hypothesis>=6.100" "httpx>=0.27" \
    "google-re2>=1.1"
# what the machine has already (torch's and transformers' own dependencies), and numpy: not carried
rm -f .gpu/whl/{numpy,tqdm,pyyaml,PyYAML,requests,urllib3,certifi,charset_normalizer,idna,typing_extensions}-*.whl
cp ../shared/data/*.jsonl.gz ../shared/data/SOURCES.md .gpu/data/   # never withheld.bin
du -sh .gpu/whl .gpu/data
