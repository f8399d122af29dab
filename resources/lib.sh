# shellcheck shell=bash
# resources/lib.sh: how the rig's ingredients are obtained and built, from Debian packages, cached under
# $IOVMM_CACHE (~/.cache/iovmm) and keyed by their inputs. Source it from bash after scripts/lib/common.sh.
#
#   res_host_packages     apt-get install what the host needs (only what is missing)
#   res_qemu              -> path of a `qemu` wrapper running QEMU 10 from bookworm-backports (extracted)
#   res_kernel            -> directory with vmlinuz, kver, lib/modules/<kver>/ (decompressed subset + depmod)
#   res_busybox           -> path of the static busybox binary
#   res_initramfs OUT DIR...  pack the union of DIRs with busybox + kernel modules into OUT (gzip cpio)
#   res_guest_image SCRIPT [SRC:DST...]
#                         -> a cached initramfs whose init runs SCRIPT as /test.sh and powers off
#                            (the level-3 guest of the rig; also what `vmm` boots in demos)
#
# Nothing here writes to stdout except the returned paths; progress goes to stderr.

RES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Kernel modules put into every image (with their dependencies). Changing the list rebuilds the kernel cache.
RES_MODULES=${RES_MODULES:-"vfio-pci vfio_iommu_type1 igb e1000e kvm-amd"}
# Lists of the private apt state older than this are refreshed (and always after a failed download).
RES_APT_MAX_AGE_DAYS=${RES_APT_MAX_AGE_DAYS:-3}

res_host_packages() {
  # kmod: depmod; cpio/gzip: images; xz-utils: module decompression; debian-archive-keyring: apt signatures;
  # ipxe-qemu: the NICs' option ROMs. The shared libraries of the extracted QEMU 10 are installed by
  # res_qemu from its package's own Depends (bookworm's qemu-system-x86 7.2 is NOT installed: it would
  # replace a qemu-utils 10 from backports that these machines come with).
  ensure_debs kmod cpio xz-utils gzip debian-archive-keyring ca-certificates ipxe-qemu
}

# A private apt state (system sources untouched): bookworm, -updates, -security, -backports.
_res_apt_root() { echo "$IOVMM_CACHE/apt"; }
_res_apt_opts() {
  local r
  r=$(_res_apt_root)
  printf '%s\n' -o "Dir::Etc::sourcelist=/dev/null" -o "Dir::Etc::sourceparts=$r/sources" \
    -o "Dir::State::Lists=$r/lists" -o "Dir::Cache=$r/cache" -o "Dir::State::status=/var/lib/dpkg/status" \
    -o "APT::Get::List-Cleanup=0" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root"
}
_res_apt() {
  local -a o
  mapfile -t o < <(_res_apt_opts)
  "$@" "${o[@]}"
}

# res_apt_update [force]: refresh the private package lists when missing, old, or forced.
res_apt_update() {
  local r stamp
  r=$(_res_apt_root)
  stamp=$r/lists/.updated
  mkdir -p "$r/sources" "$r/lists/partial" "$r/cache/archives/partial"
  cat >"$r/sources/iovmm.sources" <<EOS
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOS
  if [ "${1:-}" != force ] && [ -f "$stamp" ] && [ -z "$(find "$stamp" -mtime +"$RES_APT_MAX_AGE_DAYS")" ]; then
    return 0
  fi
  msg "refreshing Debian package lists (bookworm, -updates, -security, -backports)"
  _res_apt apt-get update -q >&2 || die "apt-get update of the rig's private package lists failed (network? see above)"
  touch "$stamp"
}

# _res_memo KEY CMD...: CMD's output, remembered until the package lists are refreshed (apt-cache is slow).
_res_memo() {
  local key=$1 dir="$IOVMM_CACHE/apt/memo"
  shift
  local f="$dir/$key"
  if [ -s "$f" ] && [ "$f" -nt "$IOVMM_CACHE/apt/lists/.updated" ]; then
    cat "$f"
    return 0
  fi
  mkdir -p "$dir"
  local out
  out=$("$@") || return 1
  [ -n "$out" ] && printf '%s\n' "$out" >"$f"
  printf '%s\n' "$out"
}

# res_deb_version PKG [SUITE]: candidate version of PKG (restricted to SUITE if given), empty if none.
res_deb_version() {
  _res_memo "version-$1@${2:-any}" _res_deb_version "$@"
}
_res_deb_version() {
  local pkg=$1 suite=${2:-}
  if [ -n "$suite" ]; then
    _res_apt apt-cache madison "$pkg" | awk -v s="$suite" -F' *[|] *' 'index($3, " " s "/") { print $2 }' \
      | sort -V | tail -n1
  else
    _res_apt apt-cache show --no-all-versions "$pkg" 2>/dev/null | awk '/^Version:/ { print $2; exit }'
  fi
}

# res_deb_fetch PKG VERSION: download PKG=VERSION into the deb cache (once); prints the .deb path.
res_deb_fetch() {
  local pkg=$1 ver=$2 dir="$IOVMM_CACHE/debs" f
  mkdir -p "$dir"
  f=$(find "$dir" -maxdepth 1 -name "${pkg}_$(printf '%s' "$ver" | sed 's/:/%3a/')_*.deb" | head -n1)
  if [ -z "$f" ]; then
    msg "downloading $pkg $ver"
    if ! (cd "$dir" && _res_apt apt-get download "$pkg=$ver" >&2); then
      res_apt_update force
      (cd "$dir" && _res_apt apt-get download "$pkg=$ver" >&2) || die "cannot download $pkg=$ver"
    fi
    f=$(find "$dir" -maxdepth 1 -name "${pkg}_$(printf '%s' "$ver" | sed 's/:/%3a/')_*.deb" | head -n1)
  fi
  [ -f "$f" ] || die "downloaded $pkg=$ver but cannot find its .deb in $dir"
  echo "$f"
}

# _res_qemu_libs DEB OUT: the libraries the extracted qemu-system-x86 DEB depends on (its Depends field:
# first alternative, versions dropped, QEMU's own packages left out; all of them are in bookworm), written
# to OUT one a line and installed.
_res_qemu_libs() {
  dpkg-deb -f "$1" Depends | tr ',' '\n' | sed 's/|.*//; s/(.*)//; s/[[:space:]]//g' \
    | grep -vE '^(qemu-|seabios|ipxe-qemu|$)' >"$2" || return 1
  _res_qemu_ensure_libs "$2"
}
_res_qemu_ensure_libs() {
  local -a libs
  mapfile -t libs <"$1"
  [ "${#libs[@]}" -eq 0 ] || ensure_debs "${libs[@]}"
}

# res_qemu: QEMU 10 from bookworm-backports, extracted (not installed) under $IOVMM_CACHE/qemu/<version>.
res_qemu() {
  res_host_packages
  res_apt_update
  local ver
  ver=$(res_deb_version qemu-system-x86 bookworm-backports)
  [ -n "$ver" ] || die "qemu-system-x86 not found in bookworm-backports (package lists: $IOVMM_CACHE/apt)"
  local dest="$IOVMM_CACHE/qemu/$ver"
  if [ ! -x "$dest/qemu" ]; then
    msg "preparing QEMU $ver (bookworm-backports, extracted into $dest)"
    _res_qemu_build() {
      local p v deb
      for p in qemu-system-x86 qemu-system-common qemu-system-data seabios; do
        v=$ver
        [ "$p" = seabios ] && v=$(res_deb_version seabios bookworm-backports)
        [ -n "$v" ] || v=$(res_deb_version "$p")
        deb=$(res_deb_fetch "$p" "$v") || return 1
        dpkg-deb -x "$deb" "$BUILD/root" || return 1
        if [ "$p" = qemu-system-x86 ]; then _res_qemu_libs "$deb" "$BUILD/libs.txt" || return 1; fi
      done
      local missing
      missing=$(ldd "$BUILD/root/usr/bin/qemu-system-x86_64" | awk '/not found/ { print $1 }')
      if [ -n "$missing" ]; then
        warn "QEMU $ver needs libraries that are not installed: $missing"
        return 1
      fi
      cat >"$BUILD/qemu" <<EOQ
#!/bin/sh
# QEMU $ver from bookworm-backports, extracted by resources/lib.sh (not installed)
R=\$(dirname "\$0")/root
export QEMU_MODULE_DIR=\$R/usr/lib/x86_64-linux-gnu/qemu
exec "\$R/usr/bin/qemu-system-x86_64" -L "\$R/usr/share/qemu" -L "\$R/usr/share/seabios" -L /usr/lib/ipxe/qemu "\$@"
EOQ
      chmod +x "$BUILD/qemu"
      "$BUILD/qemu" -version >&2 || return 1
    }
    atomic_dir_build "$dest" _res_qemu_build || die "could not prepare QEMU $ver"
  elif [ -f "$dest/libs.txt" ]; then
    _res_qemu_ensure_libs "$dest/libs.txt"  # cheap when all are there (dpkg-query only)
  fi
  echo "$dest/qemu"
}

_res_newest_kernel() {
  _res_apt apt-cache pkgnames linux-image-6.12. \
    | grep -E '^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$' | sort -V | tail -n1
}

# res_kernel_package: the newest Debian 6.12 kernel image package (name and version), resolved with apt-cache.
res_kernel_package() {
  res_apt_update
  local pkg
  pkg=$(_res_memo kernel-package _res_newest_kernel)
  [ -n "$pkg" ] || die "no linux-image-6.12.*+deb12-amd64-unsigned package in bookworm(-security)"
  echo "$pkg $(res_deb_version "$pkg")"
}

# res_kernel: vmlinuz + the RES_MODULES closure (decompressed, with depmod output) under
# $IOVMM_CACHE/kernel/<kver>-<pkgversion>-<modules hash>/. Prints that directory; its `kver` file holds uname -r.
res_kernel() {
  res_host_packages
  local pkg ver kver key dest
  read -r pkg ver < <(res_kernel_package) || true
  [ -n "${ver:-}" ] || die "could not resolve the Debian 6.12 kernel package (see the messages above)"
  kver=${pkg#linux-image-}
  kver=${kver%-unsigned}
  key=$(hash_of -s "$RES_MODULES" -s "$ver")
  dest="$IOVMM_CACHE/kernel/$kver-$key"
  if [ ! -f "$dest/vmlinuz" ]; then
    msg "preparing kernel $kver ($pkg $ver): vmlinuz and modules [$RES_MODULES]"
    _res_kernel_build() {
      local deb full="$BUILD/full"
      deb=$(res_deb_fetch "$pkg" "$ver") || return 1
      msg "extracting $(basename "$deb")"
      dpkg-deb -x "$deb" "$full" || return 1
      /sbin/depmod -b "$full" "$kver" || return 1
      local moddir="lib/modules/$kver" dep="$full/lib/modules/$kver/modules.dep"
      # closure of the wanted modules over modules.dep (module name: file name, '-' and '_' alike)
      local want=" " todo m line path deps d
      for m in $RES_MODULES; do todo+=" ${m//-/_}"; done
      local -A seen=()
      local -a paths=()
      while [ -n "${todo// /}" ]; do
        read -r m todo <<<"$todo"
        [ -n "${seen[$m]:-}" ] && continue
        seen[$m]=1
        line=$(awk -v m="$m" -F: '{ n = $1; sub(/.*\//, "", n); sub(/\.ko(\.xz|\.zst|\.gz)?$/, "", n); gsub(/-/, "_", n); if (n == m) { print; exit } }' "$dep")
        [ -n "$line" ] || { warn "module $m not found in $kver"; return 1; }
        path=${line%%:*}
        paths+=("$path")
        deps=${line#*:}
        for d in $deps; do
          d=${d##*/}
          d=${d%%.ko*}
          todo+=" ${d//-/_}"
        done
      done
      want=${paths[*]}
      mkdir -p "$BUILD/$moddir"
      for path in "${paths[@]}"; do
        mkdir -p "$BUILD/$moddir/$(dirname "$path")"
        case $path in
          *.xz) xz -dc "$full/$moddir/$path" >"$BUILD/$moddir/${path%.xz}" ;;
          *.zst) zstd -qdc "$full/$moddir/$path" >"$BUILD/$moddir/${path%.zst}" ;;
          *) cp "$full/$moddir/$path" "$BUILD/$moddir/$path" ;;
        esac || return 1
      done
      cp "$full/$moddir/modules.builtin" "$full/$moddir/modules.order" "$BUILD/$moddir/" 2>/dev/null
      [ -f "$full/$moddir/modules.builtin.modinfo" ] && cp "$full/$moddir/modules.builtin.modinfo" "$BUILD/$moddir/"
      /sbin/depmod -b "$BUILD" "$kver" || return 1
      cp "$full/boot/vmlinuz-$kver" "$BUILD/vmlinuz" || return 1
      echo "$kver" >"$BUILD/kver"
      echo "$pkg $ver" >"$BUILD/package"
      rm -rf "$full"
      msg "kernel $kver ready: $(echo "$want" | wc -w) modules"
    }
    atomic_dir_build "$dest" _res_kernel_build || die "could not prepare kernel $kver"
  fi
  echo "$dest"
}

# res_busybox: the static busybox from Debian's busybox-static, under $IOVMM_CACHE/busybox/<version>/.
res_busybox() {
  res_host_packages
  res_apt_update
  local ver dest
  ver=$(res_deb_version busybox-static)
  [ -n "$ver" ] || die "busybox-static not found in the package lists"
  dest="$IOVMM_CACHE/busybox/$ver"
  if [ ! -x "$dest/busybox" ]; then
    _res_bb_build() {
      local deb
      deb=$(res_deb_fetch busybox-static "$ver") || return 1
      dpkg-deb -x "$deb" "$BUILD/x" || return 1
      mv "$BUILD/x/bin/busybox" "$BUILD/busybox" && rm -rf "$BUILD/x"
    }
    atomic_dir_build "$dest" _res_bb_build || die "could not prepare busybox-static $ver"
  fi
  echo "$dest/busybox"
}

# res_initramfs OUT KERNEL_DIR TREE...: gzip'd newc cpio of busybox (+ applet links made at boot), the kernel's
# module subset under /lib/modules, and the union of the TREEs (copied in order; later ones win).
res_initramfs() {
  local out=$1 kdir=$2 bb w
  shift 2
  bb=$(res_busybox) || return 1
  w=$(mktemp -d "$IOVMM_CACHE/irfs.XXXX") || return 1
  mkdir -p "$w"/{bin,sbin,etc,proc,sys,dev,tmp,run,root,mnt,dev/hugepages,lib/modules}
  cp "$bb" "$w/bin/busybox"
  cp -a "$kdir/lib/modules/." "$w/lib/modules/"
  local t
  for t in "$@"; do cp -a "$t/." "$w/" || { rm -rf "$w"; return 1; }; done
  mkdir -p "$(dirname "$out")"
  (cd "$w" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --reproducible | gzip -1) >"$out.tmp" \
    || { rm -rf "$w" "$out.tmp"; return 1; }
  mv "$out.tmp" "$out"
  rm -rf "$w"
}

# res_guest_image SCRIPT [SRC:DST...]: a cached guest initramfs whose init (resources/guest-init) mounts the
# usual file systems, defines rig_pass/rig_fail, runs SCRIPT as /test.sh and powers off.
# Prints the image path; the kernel to boot it with is "$(res_kernel)/vmlinuz".
res_guest_image() {
  local script=$1
  shift
  [ -f "$script" ] || die "guest test script $script not found"
  local kdir bb key out x
  kdir=$(res_kernel) || return 1
  bb=$(res_busybox) || return 1
  local -a extra=()
  for x in "$@"; do
    [ -f "${x%%:*}" ] || die "file ${x%%:*} (for the guest image) not found"
    extra+=("${x%%:*}" -s "${x##*:}")
  done
  key=$(hash_of "$RES_DIR/guest-init" "$script" "${extra[@]}" -s "$kdir" -s "$bb")
  out="$IOVMM_CACHE/images/guest-$key.cpio.gz"
  if [ ! -f "$out" ]; then
    msg "building guest image $(basename "$out") for $(basename "$script")"
    local t
    t=$(mktemp -d "$IOVMM_CACHE/tree.XXXX")
    install -m 755 "$RES_DIR/guest-init" "$t/init"
    install -m 755 "$script" "$t/test.sh"
    for x in "$@"; do
      mkdir -p "$t/$(dirname "${x##*:}")"
      cp "${x%%:*}" "$t/${x##*:}"
    done
    res_initramfs "$out" "$kdir" "$t" || { rm -rf "$t"; die "building $out failed"; }
    rm -rf "$t"
  fi
  touch "$out"
  echo "$out"
}

# res_prune_images DAYS: drop cached images not used for DAYS days (use refreshes their mtime).
res_prune_images() {
  find "$IOVMM_CACHE/images" -maxdepth 1 -name '*.cpio.gz' -mtime +"${1:-7}" -delete 2>/dev/null || true
}
