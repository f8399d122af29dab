# shellcheck shell=sh
# dma-test: plugged igb DMAs from a VMM-made TX ring (sends); parked igb's same attempt is blocked (DMAR fault)
# Runs at level 2 after the rig's set-up (docs/rig.md). Each check prints RIG-RESULT PASS/FAIL.
. /rig/hp-l2-lib.sh

hp_start_vmm 600 --kernel "$RIG_L3_KERNEL" --initramfs "$RIG_L3_INITRD" --cmdline "$RIG_L3_CMDLINE" \
  --cpus boot=1 --memory size=256M,hugepages=on
rig_check "level 3 booted" hp_wait_l3 'RIG-HP: ready' 300 || true
hp_try add add-device "path=$RIG_NIC_SYSFS,id=nic0"
rig_check "add-device of the igb succeeds (exit $rc)" test "$rc" = 0 || true
rig_check "level 3 sees the igb (no driver bound to it)" hp_wait_l3 'RIG-HP: round 1 done' 400 || true

faults() { dmesg | grep -c 'DMAR: \[DMA Read' || true; }

# Positive control: plugged, the DMA test buffer mapped in the guest-RAM domain: the NIC reads the descriptor
# and the frame, writes the descriptor back and counts a good packet.
f0=$(faults)
hp_try plugged dma-test nic0
rig_check "dma-test on the plugged igb runs (exit $rc)" test "$rc" = 0 || true
rig_grep "plugged: it is in the guest-RAM (paging) domain" "$RIG_OUT/plugged.out" '"domain": "paging"' || true
rig_grep "plugged: the NIC wrote the descriptor back (DMA read and write through the IOMMU)" \
  "$RIG_OUT/plugged.out" '"descriptor_written_back": true' || true
rig_check "plugged: it transmitted the frame (good packets transmitted = 1)" \
  test "$(hp_num "$RIG_OUT/plugged.out" good_packets_transmitted)" = 1 || true
rig_grep "plugged: the test says sent" "$RIG_OUT/plugged.out" '"sent": true' || true
f1=$(faults)
rig_check "plugged: no DMAR fault ($f0 -> $f1)" test "$f1" = "$f0" || true

# Unplug: the guest ejects, the VMM parks the igb on the blocked domain (its container emptied, fd open).
hp_try rm remove-device nic0 --timeout 180
rig_check "remove-device succeeds (exit $rc)" test "$rc" = 0 || true
rig_grep "the igb is parked" "$RIG_OUT/rm.out" '"state": "parked"' || true
rig_check "level 3 saw it leave" hp_wait_l3 'RIG-HP: gone 1' 200 || true
hp_try info info
rig_check "parked: no mapping left in its container (live_mapped_bytes 0)" \
  test "$(hp_num "$RIG_OUT/info.out" live_mapped_bytes)" = 0 || true

# The same attempt from the parked igb, to the IOVA that was mapped while it was plugged: blocked.
hp_try parked dma-test nic0
rig_check "dma-test on the parked igb runs (exit $rc)" test "$rc" = 0 || true
rig_grep "parked: it is in the blocked domain" "$RIG_OUT/parked.out" '"domain": "blocked"' || true
rig_grep "parked: no descriptor write-back" "$RIG_OUT/parked.out" '"descriptor_written_back": false' || true
rig_check "parked: no packet left (good packets transmitted = 0)" \
  test "$(hp_num "$RIG_OUT/parked.out" good_packets_transmitted)" = 0 || true
rig_grep "parked: the test says not sent" "$RIG_OUT/parked.out" '"sent": false' || true
sleep 1
f2=$(faults)
echo "level 2 DMAR faults: before $f0, after the positive control $f1, after the parked attempt $f2"
dmesg | grep 'DMAR' | tail -n 5
rig_check "parked: level 2's kernel logged a DMAR fault for the attempt ($f1 -> $f2)" test "$f2" -gt "$f1" || true
rig_check "parked: the fault is at the test IOVA 0xf0000000" sh -c "dmesg | grep 'DMAR: \[DMA Read' | tail -n 3 | grep -q 'fault addr 0xf0000000'" || true

# Plug it again: it works after the DMA test, and it tells level 3 that level 2 is done.
hp_try readd add-device "path=$RIG_NIC_SYSFS"
rig_grep "the parked igb plugs in again after the test" "$RIG_OUT/readd.out" '"state": "plugged"' || true
rig_check "level 3 ran to its end" hp_wait_l3 'RIG-HP: level 3 done' 200 || true
hp_wait_vmm
rig_check "vmm exits 0 after level 3 powers off (exit $HP_VMM_RC)" test "$HP_VMM_RC" = 0 || true
rig_grep "nothing left at exit" "$RIG_OUT/vmm.log" '0 container\(s\), 0 BAR slot\(s\) and 0 VFIO fd\(s\) left' || true
grep -E 'hotplug|dma-test' "$RIG_OUT/vmm.log" | grep -v DEBUG | head -30
