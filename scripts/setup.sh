#!/usr/bin/env bash
# Set up everything the project needs on a fresh Debian machine: system packages, a virtual
# environment, PyTorch (installed first and pinned, so no other requirement pulls a different
# multi-GB build), then every other dependency at the exact versions of requirements.lock (with
# their hashes), then the project itself without dependencies. Re-running is cheap: each step is
# skipped when its result is already there.
#
# The lock is what CI tested: a fresh machine installs exactly that, never whatever was released
# overnight. `make lock` refreshes it (see README, "Dependencies").
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
LOCK=${LOCK:-requirements.lock}
TORCH_SPEC=$(grep -E '^(torch|torchvision)==' requirements/constraints.in | tr '\n' ' ')

need_apt=()
command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null || need_apt+=(ffmpeg)
if [ "${WITH_BROWSER:-1}" = 1 ] && ! command -v chromium >/dev/null; then need_apt+=(chromium); fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing ${need_apt[*]} (apt-get)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null 2>&1
  else
    echo "setup: please install ${need_apt[*]} (e.g. sudo apt-get install ${need_apt[*]})" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.pixelrefer-installed"
want="$(cat pyproject.toml "$LOCK" requirements/constraints.in scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
  # Machines with local package mirrors configured in pip.conf get one "Location ... is ignored"
  # line per package those mirrors lack: about the machine, not the project.
  exec 3>&2 2> >(grep --line-buffered -v "is ignored: it is neither a file nor a directory" >&3)
  "${pip[@]}" install -q --upgrade pip
  echo "setup: installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  "${pip[@]}" install -q $TORCH_SPEC
  echo "setup: installing the locked dependencies ($LOCK)"
  # --no-deps: the lock is the whole closure already, less what requirements/overrides.txt drops
  # (pip would otherwise ask for those again).
  "${pip[@]}" install -q --require-hashes --no-deps -r "$LOCK"
  # setuptools' notice about editable installs of a flat layout is information, not a problem:
  # shown only if the step fails.
  log=$("${pip[@]}" install -q --no-deps -e . 2>&1) || { echo "$log" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
# Datumaro reads our CVAT and MOTS exports back in the tests; its pins are older than ours
# (requirements/datumaro.in), so it gets a venv of its own, used as a program.
TOOLS_VENV=${TOOLS_VENV:-.venv-datumaro}
if [ "${WITH_DATUMARO:-1}" = 1 ]; then
  [ -x "$TOOLS_VENV/bin/python" ] || "$PYTHON" -m venv "$TOOLS_VENV"
  tools_stamp="$TOOLS_VENV/.pixelrefer-installed"
  tools_want="$(sha256sum < requirements/datumaro.lock | cut -c1-16)"
  if [ "$(cat "$tools_stamp" 2>/dev/null)" != "$tools_want" ]; then
    echo "setup: installing Datumaro for the export tests ($TOOLS_VENV)"
    "$TOOLS_VENV/bin/python" -m pip --disable-pip-version-check install -q --require-hashes --no-deps \
      -r requirements/datumaro.lock 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    echo "$tools_want" > "$tools_stamp"
  fi
fi
echo "setup: ready ($VENV)"
