#!/usr/bin/env bash
# Set up fcclass on this machine: Fashion-MNIST from Debian (where apt exists), a .venv with the package.
# Says what it is doing as it goes: one line per step with its time, and while pip installs, the large downloads
# (torch is about 1 GB the first time) and a count of the packages. `./setup.sh --verbose` shows pip's own output.
# Exits with the failing step's status; pip's full output is kept in .venv/pip-install.log.
set -euo pipefail
cd "$(dirname "$0")"

VERBOSE=0
case "${1:-}" in --verbose|-v) VERBOSE=1 ;; esac
START=$SECONDS

took() {  # seconds since $1, as 42s or 2m05s
  local s=$((SECONDS - $1))
  if [ "$s" -ge 60 ]; then printf '%dm%02ds' $((s / 60)) $((s % 60)); else printf '%ds' "$s"; fi
}

# pip's output, filtered: every line goes to the log; shown are the downloads of 10 MB or more and, at the end, how
# many packages were installed (on a terminal, a line that counts the packages as pip collects them).
pip_progress() {
  local log=$1 line count=0 tty=0 missing=0
  [ -t 1 ] && tty=1
  : >"$log"
  while IFS= read -r line; do
    printf '%s\n' "$line" >>"$log"
    if [ "$VERBOSE" = 1 ]; then printf '%s\n' "$line"; continue; fi
    case "$line" in
      Collecting\ *)
        count=$((count + 1))
        [ "$tty" = 1 ] && printf '\r\033[K      %d packages collected (%s)' "$count" "${line#Collecting }"
        ;;
      *Downloading\ *\ MB\)|*Downloading\ *\ GB\))
        if printf '%s' "$line" | grep -Eq '\(([0-9]{2,}(\.[0-9]+)? MB|[0-9.]+ GB)\)$'; then
          [ "$tty" = 1 ] && printf '\r\033[K'
          printf '      downloading %s\n' "$(printf '%s' "$line" | sed -E 's/^ *Downloading //; s#^.*/##')"
        fi
        ;;
      WARNING:\ Location\ *\ is\ ignored:\ it\ is\ neither\ a\ file\ nor\ a\ directory.)
        missing=$((missing + 1))  # a package index folder in pip's config that this machine lacks: harmless, once per package
        ;;
      WARNING:*|ERROR:*)
        [ "$tty" = 1 ] && printf '\r\033[K'
        printf '%s\n' "$line" >&2
        ;;
      Successfully\ installed\ *)
        [ "$tty" = 1 ] && printf '\r\033[K'
        set -- ${line#Successfully installed }
        printf '      installed %d packages\n' "$#"
        ;;
    esac
  done
  [ "$tty" = 1 ] && [ "$VERBOSE" = 0 ] && printf '\r\033[K'
  [ "$missing" -gt 0 ] && [ "$VERBOSE" = 0 ] && printf '      (%d pip warnings that a package index folder named in its config does not exist: in %s)\n' "$missing" "$log"
  return 0
}

pip_install() {  # pip_install WHAT ARGS...: pip with its output filtered, its status kept
  local what=$1 log=.venv/pip-install.log status t=$SECONDS
  shift
  echo "==> $what"
  set +e
  PYTHONUNBUFFERED=1 .venv/bin/python -m pip install --progress-bar off "$@" 2>&1 | pip_progress "$log"
  status=${PIPESTATUS[0]}
  set -e
  if [ "$status" -ne 0 ]; then
    echo "error: pip failed (exit status $status) after $(took "$t"); its last lines (all of them: $log):" >&2
    tail -n 25 "$log" >&2
    exit "$status"
  fi
  echo "    done ($(took "$t"))"
}

# Offline machines get Fashion-MNIST from Debian's package (files in /usr/share/datasets/fashion-mnist/).
if command -v apt-get >/dev/null 2>&1 && [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "==> Installing Debian's dataset-fashion-mnist with apt-get (about 30 MB)"
  t=$SECONDS
  if $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; then
    echo "    done ($(took "$t"))"
  else
    echo "warning: could not install dataset-fashion-mnist; torchvision will download Fashion-MNIST instead." >&2
  fi
fi

# The browser test of `fcclass serve`'s page drives Debian's chromium with Playwright (which cannot download its own
# browser here); without it that test is skipped.
if command -v apt-get >/dev/null 2>&1 && ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "==> Installing Debian's chromium with apt-get (about 100 MB; for the browser test of fcclass serve's page)"
  t=$SECONDS
  if $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null; then
    echo "    done ($(took "$t"))"
  else
    echo "warning: could not install chromium; the browser test of fcclass serve's page will be skipped." >&2
  fi
fi

PYTHON="${PYTHON:-python3}"
if [ -x .venv/bin/python ]; then
  echo "==> Using the existing .venv ($(.venv/bin/python --version 2>&1))"
else
  echo "==> Creating .venv with $PYTHON ($("$PYTHON" --version 2>&1))"
  t=$SECONDS
  "$PYTHON" -m venv .venv
  echo "    done ($(took "$t"))"
fi
pip_install "Upgrading pip" -q --upgrade pip
pip_install "Installing fcclass and its dependencies (torch, torchvision, ...; the first time a few minutes)" -e '.[dev]'
echo "Ready in $(took "$START"): .venv/bin/fcclass --help"
