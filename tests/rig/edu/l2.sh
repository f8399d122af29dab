# shellcheck shell=sh
# vmm --edu 1 boots level 3, whose test drives the edu's DMA through the soft IOMMU; vmm's log agrees
# Runs at level 2 after the rig's set-up (docs/rig.md). Each check prints RIG-RESULT PASS/FAIL; level 3's
# checks (l3.sh) print theirs on its console.
rc=0
rig_vmm -t 200 --kernel "$RIG_L3_KERNEL" --initramfs "$RIG_L3_INITRD" --cmdline "$RIG_L3_CMDLINE" \
  --cpus boot=1 --memory size=128M --edu 1 -v || rc=$?
rig_check "vmm exits 0 after level 3 powers off (exit $rc)" test "$rc" = 0 || true
rig_grep "level 3 ran its test to the end" "$RIG_OUT/l3-console.log" 'RIG-GUEST: test.sh exited 0' || true
rig_grep "vmm plugged the edu with DMA through the soft IOMMU" "$RIG_OUT/vmm.log" \
  'edu: edu0 plugged as guest PCI .*DMA through the soft IOMMU' || true
rig_grep "the read beyond guest RAM was refused as an IOMMU fault" "$RIG_OUT/vmm.log" \
  'edu0: DMA of 0x40 bytes from bus address 0xf000000 refused, nothing copied: IOMMU fault at bus address 0xf000000: IOVA not mapped' || true
rig_grep "vmm counted 3 transfers and 1 fault, then parked and released the edu" "$RIG_OUT/vmm.log" \
  'edu: edu0: 3 transfer\(s\), 192 bytes, 1 refused \(1 IOMMU faults\); parked and released' || true
