# shellcheck shell=sh
# --device errors: missing path, not bound to vfio-pci, memlock too low: clear error, non-zero exit, no leftovers
# Runs at level 2 after the rig's set-up (docs/rig.md). Each check prints RIG-RESULT PASS/FAIL.

# try LABEL ARGS...: runs vmm (a 256 MiB guest that never boots: the preflight stops it) and keeps its exit
# status in $rc and its stderr in $RIG_OUT/LABEL.err.
try() {
  label=$1
  shift
  rc=0
  timeout -s KILL 60 "$VMM" --kernel "$RIG_L3_KERNEL" --initramfs "$RIG_L3_INITRD" --memory size=256M "$@" \
    >"$RIG_OUT/$label.out" 2>"$RIG_OUT/$label.err" || rc=$?
  echo "--- vmm $* (exit $rc):"
  cat "$RIG_OUT/$label.err"
}

# no_leftovers LABEL: no vmm process, the igb on the driver it had ($1), its group free to open again.
no_leftovers() {
  rig_check "$1: no vmm process is left" sh -c '! pidof vmm' || true
  rig_check "$1: the igb is still on $2" test "$(rig_driver "$RIG_NIC_BDF")" = "$2" || true
  if [ "$2" = vfio-pci ]; then
    "$VMM" check-host >"$RIG_OUT/ch-$1.txt" 2>&1 || true
    rig_grep "$1: group $RIG_NIC_GROUP opens again (check-host reads its page sizes)" "$RIG_OUT/ch-$1.txt" \
      "from group $RIG_NIC_GROUP\\)\$" || true
  fi
}

# 1. A path that does not exist.
try missing --device path=/sys/bus/pci/devices/0000:00:1f.7
rig_check "missing path: non-zero exit ($rc)" test "$rc" != 0 || true
rig_grep "missing path: says there is no such device" "$RIG_OUT/missing.err" \
  '0000:00:1f.7: no such device.*ls /sys/bus/pci/devices' || true
no_leftovers missing vfio-pci

# 2. The igb bound to its host driver.
if rig_bind "$RIG_NIC_BDF" igb; then
  try bound --device "path=$RIG_NIC_SYSFS"
  rig_check "bound to igb: non-zero exit ($rc)" test "$rc" != 0 || true
  rig_grep "bound to igb: says which driver holds it" "$RIG_OUT/bound.err" \
    "$RIG_NIC_BDF: bound to driver 'igb', not to vfio-pci" || true
  rig_grep "bound to igb: prints the driver_override command" "$RIG_OUT/bound.err" \
    "echo vfio-pci > /sys/bus/pci/devices/$RIG_NIC_BDF/driver_override" || true
  rig_grep "bound to igb: prints the unbind command" "$RIG_OUT/bound.err" \
    "echo $RIG_NIC_BDF > /sys/bus/pci/devices/$RIG_NIC_BDF/driver/unbind" || true
  rig_grep "bound to igb: prints the drivers_probe command" "$RIG_OUT/bound.err" \
    "echo $RIG_NIC_BDF > /sys/bus/pci/drivers_probe" || true
  no_leftovers bound igb
  rig_check "the igb goes back to vfio-pci" rig_bind "$RIG_NIC_BDF" vfio-pci || true
else
  rig_fail "could not bind the igb to igb"
fi

# 3. A memlock limit below guest RAM (256 MiB for one group): 1 MiB.
rc=0
(
  ulimit -l 1024
  echo "memlock limit in the subshell: $(ulimit -l) KiB"
  try memlock --device "path=$RIG_NIC_SYSFS"
  exit "$rc"
) || rc=$?
rig_check "memlock too low: non-zero exit ($rc)" test "$rc" != 0 || true
rig_grep "memlock too low: names the limit and what is needed" "$RIG_OUT/memlock.err" \
  'memlock limit \(RLIMIT_MEMLOCK\) is 1048576 bytes.*268435456 bytes' || true
rig_grep "memlock too low: says how to raise it" "$RIG_OUT/memlock.err" 'ulimit -l 262144.*prlimit' || true
no_leftovers memlock vfio-pci
