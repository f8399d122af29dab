# shellcheck shell=sh
# vmm boots level 3 with the igb passed through; level 3 pings the gateway; the group opens again afterwards
# Runs at level 2 after the rig's set-up (docs/rig.md). Each check prints RIG-RESULT PASS/FAIL; level 3's
# own checks (l3.sh) print theirs on the level-3 console.

rc=0
rig_vmm -t 700 --kernel "$RIG_L3_KERNEL" --initramfs "$RIG_L3_INITRD" --cmdline "$RIG_L3_CMDLINE" \
  --cpus boot=1 --memory size=256M,hugepages=on --device "path=$RIG_NIC_SYSFS" -v || rc=$?
rig_check "vmm exits 0 after level 3 powers off (exit $rc)" test "$rc" = 0 || true
rig_grep "level 3 ran its test to the end" "$RIG_OUT/l3-console.log" 'RIG-GUEST: test.sh exited 0' || true
rig_grep "vmm opened the igb in a container of its own" "$RIG_OUT/vmm.log" \
  "vfio: opened $RIG_NIC_SYSFS \\(group $RIG_NIC_GROUP\\) in a container of its own" || true
rig_grep "vmm logged the guest-RAM map calls (one per region, 256 MiB)" "$RIG_OUT/vmm.log" \
  'DMA-mapped IOVA=GPA: 1 VFIO_IOMMU_MAP_DMA call\(s\), 268435456 bytes' || true
rig_grep "BARs are mapped into KVM memory slots once the guest enables memory decode" "$RIG_OUT/vmm.log" \
  'memory decode on: [1-9][0-9]* BAR part\(s\) mapped directly into the guest' || true
rig_grep "vmm enabled MSI-X through irqfds" "$RIG_OUT/vmm.log" 'MSI-X enabled, [0-9]+ vectors signalled through irqfds' || true
rig_grep "vmm released the igb through the component" "$RIG_OUT/vmm.log" \
  "passthrough: $RIG_NIC_BDF released \\(release domain, then fds closed\\)" || true
rig_grep "nothing left: no container, no BAR slot, no VFIO fd" "$RIG_OUT/vmm.log" \
  "0 container\\(s\\), 0 BAR slot\\(s\\) and 0 VFIO fd\\(s\\) left" || true
grep -E 'passthrough:|vfio' "$RIG_OUT/vmm.log" | grep -v DEBUG | head -20

# After vmm: the group can be opened again (check-host opens /dev/vfio/N and reads its page sizes) ...
ch=$RIG_OUT/check-host-after.txt
"$VMM" check-host >"$ch" 2>&1 || true
rig_grep "after vmm exits, group $RIG_NIC_GROUP is viable again" "$ch" \
  "^group $RIG_NIC_GROUP: viable, /dev/vfio/$RIG_NIC_GROUP, kernel: viable\$" || true
rig_grep "and its container can be set up again (page sizes read from group $RIG_NIC_GROUP)" "$ch" \
  "from group $RIG_NIC_GROUP\\)\$" || true
# ... and the host can bind the NIC to its own driver again.
rig_check "the host binds the igb to igb again" rig_bind "$RIG_NIC_BDF" igb || true
rig_check "and back to vfio-pci" rig_bind "$RIG_NIC_BDF" vfio-pci || true
