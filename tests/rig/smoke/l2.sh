# shellcheck shell=sh
# level 2 boots with /dev/kvm and the igb on vfio-pci; vmm check-host tells the truth about it
# Runs at level 2 after the rig's set-up (docs/rig.md). Each check prints RIG-RESULT PASS/FAIL.

rig_check "/dev/kvm is a character device" test -c /dev/kvm || true
rig_check "the igb $RIG_NIC_BDF is bound to vfio-pci" test "$(rig_driver "$RIG_NIC_BDF")" = vfio-pci || true
rig_check "/dev/vfio/$RIG_NIC_GROUP exists" test -c "/dev/vfio/$RIG_NIC_GROUP" || true

# The truth, from sysfs and procfs.
ngroups=$(ls /sys/kernel/iommu_groups | wc -l)
hp_total=$(awk '/^HugePages_Total:/ { print $2 }' /proc/meminfo)
hp_size=$(awk '/^Hugepagesize:/ { print $2 }' /proc/meminfo)
members=$(ls "$RIG_NIC_SYSFS/iommu_group/devices" | wc -l)
echo "truth: igb $RIG_NIC_BDF group $RIG_NIC_GROUP ($members devices), $ngroups groups, hugepages $hp_total x $hp_size kB"

ch=$RIG_OUT/check-host.txt
rc=0
"$VMM" check-host >"$ch" 2>"$RIG_OUT/check-host.err" || rc=$?
echo "--- vmm check-host (exit $rc):"
cat "$ch" "$RIG_OUT/check-host.err"
rig_check "vmm check-host exits 0 on a host that is ready" test "$rc" = 0 || true
rig_grep "check-host reports the KVM API version" "$ch" '^kvm: /dev/kvm API version 12$' || true
rig_grep "check-host reports the VFIO type1v2 backend" "$ch" '^vfio: /dev/vfio/vfio API version 0, type1v2 yes' || true
rig_grep "check-host counts $ngroups IOMMU groups" "$ch" "^iommu groups: $ngroups\$" || true
rig_grep "check-host says group $RIG_NIC_GROUP is viable (and the kernel agrees)" "$ch" \
  "^group $RIG_NIC_GROUP: viable, /dev/vfio/$RIG_NIC_GROUP, kernel: viable\$" || true
rig_grep "check-host lists the igb in group $RIG_NIC_GROUP on vfio-pci" "$ch" \
  "^  device $RIG_NIC_BDF 8086:10c9 class 020000 driver vfio-pci\$" || true
rig_grep "check-host reads the IOMMU page sizes from group $RIG_NIC_GROUP" "$ch" \
  "^iommu page sizes: 4 KiB, 2 MiB, 1 GiB \\(bitmap 0x[0-9a-f]+, from group $RIG_NIC_GROUP\\)\$" || true
rig_grep "check-host reports $hp_total hugepages of $hp_size KiB" "$ch" \
  "^hugepages: total $hp_total free [0-9]+ reserved [0-9]+ surplus [0-9]+ of $hp_size KiB" || true
rig_grep "check-host reports the memlock limit (unlimited here)" "$ch" '^memlock: soft unlimited hard unlimited$' || true
rig_grep "check-host says the host is ready" "$ch" '^ready for passthrough: yes$' || true

"$VMM" check-host --json >"$RIG_OUT/check-host.json" 2>&1 || true
rig_grep "check-host --json lists group $RIG_NIC_GROUP" "$RIG_OUT/check-host.json" "\"id\": $RIG_NIC_GROUP," || true

# Give the igb back to its kernel driver: the group must turn NOT viable, naming the culprit.
if rig_bind "$RIG_NIC_BDF" igb; then
  "$VMM" check-host >"$ch" 2>&1 || true
  rig_grep "with the igb on its kernel driver, group $RIG_NIC_GROUP is NOT viable" "$ch" \
    "^group $RIG_NIC_GROUP: NOT viable \\($RIG_NIC_BDF is bound to igb" || true
  rig_grep "and the page sizes are unknown, with the reason" "$ch" '^iommu page sizes: unknown \(no viable VFIO group' || true
  rig_check "the igb goes back to vfio-pci" rig_bind "$RIG_NIC_BDF" vfio-pci || true
else
  rig_fail "could not rebind the igb to its kernel driver igb"
fi

# Something required missing: check-host must fail with a clear message. Hide /dev/kvm.
mv /dev/kvm /dev/kvm.hidden
rc=0
"$VMM" check-host >"$ch" 2>"$RIG_OUT/check-host.err" || rc=$?
mv /dev/kvm.hidden /dev/kvm
cat "$RIG_OUT/check-host.err"
rig_check "check-host exits non-zero without /dev/kvm" test "$rc" != 0 || true
rig_grep "and says what is missing" "$RIG_OUT/check-host.err" 'cannot pass devices through yet' || true
rig_grep "naming /dev/kvm" "$RIG_OUT/check-host.err" '/dev/kvm: .*load kvm_intel or kvm_amd' || true
