#!/usr/bin/env bash
# The main job: build the built-in demo zoo locally (no downloads), merge it with several methods,
# evaluate, print the comparison and write a report folder.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mergesmith demo "$@"
