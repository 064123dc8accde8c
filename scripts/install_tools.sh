#!/usr/bin/env bash
# System tools the checks need and pip cannot provide: promtool (Debian's prometheus package).
set -euo pipefail
if command -v promtool >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "install_tools: installing promtool (apt-get install prometheus)"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  command -v promtool >/dev/null
else
  echo "install_tools: promtool is missing; install Debian's 'prometheus' package (or put promtool on PATH)" >&2
  exit 1
fi
