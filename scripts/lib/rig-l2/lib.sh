# shellcheck shell=sh
# /rig/lib.sh at level 2: the helpers a scenario's l2.sh can use (it is sourced before l2.sh runs).
# busybox ash; keep it POSIX.
#
# Variables set for l2.sh:
#   VMM               /bin/vmm, the project's binary built by scripts/rig
#   RIG_NIC_BDF       the igb's PCI address (e.g. 0000:00:02.0); RIG_NIC_SYSFS its sysfs folder
#   RIG_NIC_GROUP     its IOMMU group number (the N of /dev/vfio/N)
#   RIG_L3_KERNEL     level-3 kernel (bzImage); RIG_L3_INITRD the level-3 initramfs (only when l3.sh exists)
#   RIG_L3_CMDLINE    a command line for level 3 ("console=ttyS0 panic=-1 quiet")
#   RIG_OUT           a folder for scratch files (/tmp/rig)
#   RIG_VMM_LOG_TTY   the serial port that lands in vmm.log on the host; RIG_L3_TTY the one for l3-console.log
# From tests/rig/<name>/rig.conf: RIG_BIND (vfio-pci|none), RIG_HUGEPAGES.

VMM=/bin/vmm
RIG_OUT=/tmp/rig
RIG_L3_KERNEL=/rig/l3/vmlinuz
RIG_L3_INITRD=/rig/l3/initramfs.cpio.gz
RIG_L3_CMDLINE="console=ttyS0 panic=-1 quiet"
RIG_VMM_LOG_TTY=/dev/ttyS1
RIG_L3_TTY=/dev/ttyS2
RIG_BIND=vfio-pci
RIG_HUGEPAGES=256
RIG_MODULES="vfio-pci vfio_iommu_type1 igb kvm-amd"
export VMM RIG_OUT RIG_L3_KERNEL RIG_L3_INITRD RIG_L3_CMDLINE
mkdir -p "$RIG_OUT"

rig_pass() { echo "RIG-RESULT PASS $*"; }
rig_fail() { echo "RIG-RESULT FAIL $*"; }

# rig_check WHAT CMD...: runs CMD; PASS or FAIL with WHAT. Returns CMD's status, so `set -e` stops there
# when that is wanted; append `|| true` to go on.
rig_check() {
  _rc_what=$1
  shift
  if "$@"; then
    rig_pass "$_rc_what"
  else
    _rc=$?
    rig_fail "$_rc_what (exit $_rc: $*)"
    return $_rc
  fi
}

# rig_grep WHAT FILE PATTERN: PASS if FILE has a line matching the extended regex PATTERN, else FAIL
# (and the file's last lines are shown).
rig_grep() {
  if grep -Eq -- "$3" "$2"; then
    rig_pass "$1"
  else
    rig_fail "$1 (no line matching '$3' in $2)"
    echo "--- last lines of $2:"
    tail -n 15 "$2"
    return 1
  fi
}

# rig_log_tty TTY: makes a serial port carry bytes unchanged (no \r added).
rig_log_tty() { stty -F "$1" raw -echo 2>/dev/null || true; }

# rig_vmm [-t SECONDS] ARGS...: runs "$VMM ARGS" (default time limit 240 s). Its stdout (the level-3
# console) goes to $RIG_OUT/l3-console.log and to the host's l3-console.log, its stderr (the VMM's log) to
# $RIG_OUT/vmm.log and the host's vmm.log, both live. Returns vmm's exit status (124: timed out).
_rig_vmm_n=0
rig_vmm() {
  _t=240
  if [ "$1" = -t ]; then
    _t=$2
    shift 2
  fi
  _rig_vmm_n=$((_rig_vmm_n + 1))
  _hdr="=== rig_vmm #$_rig_vmm_n: vmm $*"
  echo "RIG-L2: $_hdr"
  echo "$_hdr" >>"$RIG_VMM_LOG_TTY"
  echo "$_hdr" >>"$RIG_L3_TTY"
  rm -f "$RIG_OUT/out.fifo" "$RIG_OUT/err.fifo"
  mkfifo "$RIG_OUT/out.fifo" "$RIG_OUT/err.fifo"
  tee "$RIG_OUT/l3-console.log" <"$RIG_OUT/out.fifo" >>"$RIG_L3_TTY" &
  _p1=$!
  tee "$RIG_OUT/vmm.log" <"$RIG_OUT/err.fifo" >>"$RIG_VMM_LOG_TTY" &
  _p2=$!
  _rc=0
  timeout -s KILL "$_t" "$VMM" "$@" >"$RIG_OUT/out.fifo" 2>"$RIG_OUT/err.fifo" || _rc=$?
  wait "$_p1" "$_p2" 2>/dev/null
  # busybox timeout reports a killed child as 128+9
  if [ "$_rc" = 137 ] || [ "$_rc" = 124 ]; then
    rig_fail "vmm $* did not finish within $_t s"
    echo "--- last lines of the level-3 console:"
    tail -n 15 "$RIG_OUT/l3-console.log"
    _rc=124
  fi
  echo "RIG-L2: vmm exited $_rc"
  return $_rc
}

# rig_driver BDF: the driver a PCI device is bound to ("none" if unbound).
rig_driver() {
  if [ -e "/sys/bus/pci/devices/$1/driver" ]; then
    basename "$(readlink "/sys/bus/pci/devices/$1/driver")"
  else
    echo none
  fi
}

# rig_bind BDF DRIVER|none: (re)binds a PCI device to DRIVER with driver_override, or leaves it unbound.
rig_bind() {
  _d=/sys/bus/pci/devices/$1
  [ -d "$_d" ] || { echo "rig_bind: no PCI device $1"; return 1; }
  if [ "$2" = none ]; then
    echo >"$_d/driver_override"
  else
    echo "$2" >"$_d/driver_override"
  fi
  [ -e "$_d/driver" ] && echo "$1" >"$_d/driver/unbind"
  [ "$2" = none ] && return 0
  echo "$1" >/sys/bus/pci/drivers_probe
  [ "$(rig_driver "$1")" = "$2" ] || { echo "rig_bind: $1 is bound to $(rig_driver "$1"), not $2"; return 1; }
}

# rig_setup: the common set-up, before l2.sh. Prints RIG-SETUP-FAIL and returns 1 on any failure.
rig_setup() {
  _fail() {
    echo "RIG-SETUP-FAIL $*"
    return 1
  }
  rig_log_tty "$RIG_VMM_LOG_TTY"
  rig_log_tty "$RIG_L3_TTY"
  for _m in $RIG_MODULES; do
    modprobe "$_m" || _fail "modprobe $_m failed" || return 1
  done
  [ -c /dev/kvm ] || _fail "no /dev/kvm after modprobe kvm-amd (is the level-2 CPU 'max' with svm?)" || return 1
  [ -c /dev/vfio/vfio ] || _fail "no /dev/vfio/vfio after modprobe vfio-pci" || return 1
  RIG_NIC_BDF=
  for _d in /sys/bus/pci/devices/*; do
    if [ "$(cat "$_d/vendor"):$(cat "$_d/device")" = 0x8086:0x10c9 ]; then
      RIG_NIC_BDF=$(basename "$_d")
      break
    fi
  done
  [ -n "$RIG_NIC_BDF" ] || _fail "no igb (8086:10c9) on the level-2 PCI bus" || return 1
  RIG_NIC_SYSFS=/sys/bus/pci/devices/$RIG_NIC_BDF
  [ -e "$RIG_NIC_SYSFS/iommu_group" ] || _fail "the igb $RIG_NIC_BDF has no IOMMU group (intel_iommu=on?)" || return 1
  RIG_NIC_GROUP=$(basename "$(readlink "$RIG_NIC_SYSFS/iommu_group")")
  export RIG_NIC_BDF RIG_NIC_SYSFS RIG_NIC_GROUP
  if [ "$RIG_BIND" != none ]; then
    rig_bind "$RIG_NIC_BDF" "$RIG_BIND" || _fail "could not bind the igb $RIG_NIC_BDF to $RIG_BIND" || return 1
  fi
  echo "RIG-L2: igb $RIG_NIC_BDF group $RIG_NIC_GROUP driver $(rig_driver "$RIG_NIC_BDF")"
  if [ "${RIG_HUGEPAGES:-0}" -gt 0 ]; then
    echo "$RIG_HUGEPAGES" >/proc/sys/vm/nr_hugepages
    _got=$(cat /proc/sys/vm/nr_hugepages)
    [ "$_got" -ge "$RIG_HUGEPAGES" ] || _fail "asked for $RIG_HUGEPAGES hugepages, got $_got" || return 1
  fi
  ulimit -l unlimited || _fail "ulimit -l unlimited failed" || return 1
  [ -x "$VMM" ] || _fail "no $VMM in the image" || return 1
  return 0
}
