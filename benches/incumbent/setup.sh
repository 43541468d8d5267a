#!/usr/bin/env bash
# Installs the incumbent, Singer tap-mixpanel 1.8.0 (PyPI), pinned, into its own venv:
# benches/incumbent/.venv (not committed). The benchmark runs it through run_tap.py.
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
STAMP="$VENV/.installed-$(sha256sum requirements.txt | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  echo "incumbent/setup.sh: installing tap-mixpanel 1.8.0 into benches/incumbent/$VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps -r requirements.txt
  "$VENV/bin/python" -c "import tap_mixpanel" >/dev/null
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi
