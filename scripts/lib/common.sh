# shellcheck shell=bash
# scripts/lib/common.sh: shared shell helpers for the project's scripts (rig, resources, CI glue).
# Source it from bash: `. "$(dirname "$0")/lib/common.sh"`. It sets nothing global except the
# IOVMM_* variables below and the functions; it does not change shell options of the caller.
#
#   IOVMM_ROOT   the repository root
#   IOVMM_CACHE  ~/.cache/iovmm (override with IOVMM_CACHE=...): downloads and built images, keyed by inputs

IOVMM_ROOT=${IOVMM_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
IOVMM_CACHE=${IOVMM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/iovmm}
export IOVMM_ROOT IOVMM_CACHE

# Messages go to stderr so that functions can return values on stdout.
_iovmm_t0=${_iovmm_t0:-$SECONDS}
msg() { printf '[%4ds] %s\n' "$((SECONDS - _iovmm_t0))" "$*" >&2; }
warn() { printf '[%4ds] warning: %s\n' "$((SECONDS - _iovmm_t0))" "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# need_cmd CMD...: die with a clear message if a command is not on PATH.
need_cmd() {
  local c
  for c in "$@"; do
    command -v "$c" >/dev/null 2>&1 || die "'$c' is not installed (and could not be installed automatically)"
  done
}

# ensure_debs PKG...: apt-get install the Debian packages that are not installed yet (idempotent; runs
# `apt-get update` first only when something is missing). Needs root, as everything on these machines.
ensure_debs() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "missing Debian packages ${missing[*]}; install them as root: apt-get install ${missing[*]}"
  msg "installing Debian packages: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
  # Say so loudly when the install replaces something: a shared machine's owner should know.
  local removed
  removed=$(apt-get install -s --no-install-recommends "${missing[@]}" 2>/dev/null | awk '/^Remv / { print $2 }' | tr '\n' ' ')
  [ -n "$removed" ] && warn "installing ${missing[*]} removes: $removed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
    || die "apt-get install ${missing[*]} failed"
}

# hash_of [FILE|-]...: a short content hash of files (in order) plus any extra strings given with -s STR.
#   hash_of a.sh b.sh -s "kernel=6.12.1"  ->  16 hex digits
hash_of() {
  {
    while [ $# -gt 0 ]; do
      if [ "$1" = -s ]; then
        printf 'str:%s\n' "$2"
        shift 2
      else
        printf 'file:%s\n' "$(basename "$1")"
        cat "$1" || return 1
        shift
      fi
    done
  } | sha256sum | cut -c1-16
}

# hash_tree DIR: content hash of every file under DIR (names and contents, sorted by path).
hash_tree() {
  (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum) | sha256sum | cut -c1-16
}

# atomic_dir_build DEST CMD...: run CMD with $BUILD set to a fresh temp dir next to DEST; on success move it
# into place, so an interrupted build never leaves a half-filled cache entry.
atomic_dir_build() {
  local dest=$1
  shift
  mkdir -p "$(dirname "$dest")"
  local tmp
  tmp=$(mktemp -d "$dest.tmp.XXXX") || die "cannot create a temp dir next to $dest"
  if BUILD=$tmp "$@"; then
    rm -rf "$dest"
    mv "$tmp" "$dest"
  else
    rm -rf "$tmp"
    return 1
  fi
}

# fmt_secs SECONDS_FLOAT: 12.3
fmt_secs() { awk -v s="$1" 'BEGIN { printf "%.1f", s }'; }

# now_secs: seconds since the epoch with a fraction
now_secs() { date +%s.%N; }

# since T0: seconds elapsed since T0 (from now_secs), formatted like 12.3
since() { awk -v a="$1" -v b="$(now_secs)" 'BEGIN { printf "%.1f", b - a }'; }
