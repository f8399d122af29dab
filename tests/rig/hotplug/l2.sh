# shellcheck shell=sh
# vmm boots level 3 with no passthrough device; the igb is hot-added (pings), removed (parked), added again (pings)
# Runs at level 2 after the rig's set-up (docs/rig.md). Each check prints RIG-RESULT PASS/FAIL; level 3's own
# checks (l3.sh) print theirs on the level-3 console. The two sides meet through level 3's RIG-HP markers.
. ./l2-lib.sh

hp_start_vmm 800 --kernel "$RIG_L3_KERNEL" --initramfs "$RIG_L3_INITRD" --cmdline "$RIG_L3_CMDLINE" \
  --cpus boot=1 --memory size=256M,hugepages=on
rig_check "level 3 booted and is waiting for the igb" hp_wait_l3 'RIG-HP: ready' 300 || true

# Bad requests get error replies and the VMM goes on.
hp_try garbage raw 'this is not json'
rig_check "a request that is not JSON gets an error reply (exit $rc)" test "$rc" = 1 || true
rig_grep "and the reply says so" "$RIG_OUT/garbage.out" '"ok":false,"error":"the request is not JSON' || true
hp_try unknown raw '{"command":"reboot"}'
rig_grep "an unknown command gets an error reply" "$RIG_OUT/unknown.out" '"ok":false.*unknown variant' || true
hp_try noid remove-device nosuch
rig_check "remove-device of an unknown id fails (exit $rc)" test "$rc" = 1 || true
rig_grep "and says there is no such device" "$RIG_OUT/noid.out" "no device with id or BDF 'nosuch'" || true
hp_try nopath add-device path=/sys/bus/pci/devices/0000:00:1f.7
rig_check "add-device of a missing path fails (exit $rc)" test "$rc" = 1 || true
rig_grep "and says there is no such device" "$RIG_OUT/nopath.out" 'no such device' || true
rig_check "the VMM still answers" remote ping || true

# Round 1: add, the guest binds and pings (l3.sh), remove.
hp_try add1 add-device "path=$RIG_NIC_SYSFS,id=nic0"
rig_check "add-device of the igb succeeds (exit $rc)" test "$rc" = 0 || true
rig_grep "it is plugged" "$RIG_OUT/add1.out" '"state": "plugged"' || true
rig_check "level 3 finished round 1 (igb bound, pinged)" hp_wait_l3 'RIG-HP: round 1 done' 400 || true
hp_try dup add-device "path=$RIG_NIC_SYSFS"
rig_check "adding the plugged igb again is refused (exit $rc)" test "$rc" = 1 || true
hp_try rm1 remove-device nic0 --timeout 180
rig_check "remove-device nic0 succeeds: the guest ejected it (exit $rc)" test "$rc" = 0 || true
rig_grep "it is parked" "$RIG_OUT/rm1.out" '"state": "parked"' || true
rig_check "level 3 saw it leave" hp_wait_l3 'RIG-HP: gone 1' 200 || true
hp_try list1 list-devices
rig_grep "list-devices shows it parked" "$RIG_OUT/list1.out" '"state": "parked"' || true
rig_grep "in the blocked domain" "$RIG_OUT/list1.out" '"domain": "blocked"' || true
rig_grep "held by the VMM (DMA owner Parked)" "$RIG_OUT/list1.out" '"dma_owner": "Parked' || true
rig_grep "with its device fd still open" "$RIG_OUT/list1.out" '"device_fd_open": true' || true
hp_try info1 info
rig_check "no DMA mapping is left in any container (live_mapped_bytes 0)" \
  test "$(hp_num "$RIG_OUT/info1.out" live_mapped_bytes)" = 0 || true
rig_check "no KVM BAR slot is left" test "$(hp_num "$RIG_OUT/info1.out" bar_slots)" = 0 || true
rig_check "no MSI GSI route / irqfd is left" test "$(hp_num "$RIG_OUT/info1.out" msi_gsis)" = 0 || true

# Round 2: the parked igb is added again (its container gets guest RAM again), pings, removed.
hp_try add2 add-device "path=$RIG_NIC_SYSFS"
rig_check "add-device of the parked igb succeeds (exit $rc)" test "$rc" = 0 || true
rig_grep "it is plugged again under its id" "$RIG_OUT/add2.out" '"id": "nic0"' || true
rig_check "it was plugged twice" test "$(hp_num "$RIG_OUT/add2.out" times_plugged)" = 2 || true
rig_check "level 3 finished round 2 (igb bound again, pinged)" hp_wait_l3 'RIG-HP: round 2 done' 400 || true
hp_try rm2 remove-device nic0 --timeout 180
rig_grep "removed and parked again" "$RIG_OUT/rm2.out" '"state": "parked"' || true

rig_check "level 3 ran to its end" hp_wait_l3 'RIG-HP: level 3 done' 200 || true
hp_wait_vmm
rig_check "vmm exits 0 after level 3 powers off (exit $HP_VMM_RC)" test "$HP_VMM_RC" = 0 || true
rig_grep "level 3's test ran to the end" "$RIG_OUT/l3-console.log" 'RIG-GUEST: test.sh exited 0' || true
rig_grep "vmm parked the igb after the guest's eject (blocked domain, container emptied)" "$RIG_OUT/vmm.log" \
  'nic0 \(.*\) parked: blocked domain attached' || true
rig_grep "vmm replayed guest RAM into the container on the second add" "$RIG_OUT/vmm.log" \
  'guest RAM mapped into its container again: 1 VFIO_IOMMU_MAP_DMA' || true
rig_grep "vmm released the igb at exit" "$RIG_OUT/vmm.log" 'nic0 .* released \(release domain, then fds closed\)' || true
rig_grep "nothing left at exit" "$RIG_OUT/vmm.log" '0 container\(s\), 0 BAR slot\(s\) and 0 VFIO fd\(s\) left' || true
grep -E 'hotplug|api' "$RIG_OUT/vmm.log" | grep -v DEBUG | head -40

# A device given at boot (--device) with an API socket is owned by the hotplug manager: it can be removed.
hp_start_vmm 400 --kernel "$RIG_L3_KERNEL" --initramfs "$RIG_L3_INITRD" --cmdline "$RIG_L3_CMDLINE rig.coldplug" \
  --cpus boot=1 --memory size=256M,hugepages=on --device "path=$RIG_NIC_SYSFS"
hp_try cold-list list-devices
rig_grep "cold-plugged: list-devices shows the --device igb plugged" "$RIG_OUT/cold-list.out" '"state": "plugged"' || true
rig_check "cold-plugged: level 3 binds it and pings" hp_wait_l3 'RIG-HP: round 1 done' 400 || true
hp_try cold-rm remove-device "$RIG_NIC_BDF" --timeout 180
rig_grep "cold-plugged: remove-device (by BDF) parks it" "$RIG_OUT/cold-rm.out" '"state": "parked"' || true
rig_check "cold-plugged: level 3 saw it leave" hp_wait_l3 'RIG-HP: gone 1' 200 || true
# Added again, then ejected by the guest itself (slot power off in level 3): the VMM parks it all the same.
hp_try cold-add add-device "path=$RIG_NIC_SYSFS"
rig_grep "cold-plugged: added again" "$RIG_OUT/cold-add.out" '"state": "plugged"' || true
rig_check "guest eject: level 3 powered the slot off and the igb left" hp_wait_l3 'RIG-HP: gone 2' 400 || true
rig_check "cold-plugged: level 3 ran to its end" hp_wait_l3 'RIG-HP: level 3 done' 200 || true
hp_wait_vmm
rig_check "cold-plugged: vmm exits 0 (exit $HP_VMM_RC)" test "$HP_VMM_RC" = 0 || true
# (Level 3 powers off right after its own eject, so this is read from the VMM's log, not list-devices.)
parks=$(grep -c 'vfio0 (.*) parked: blocked domain attached' "$RIG_OUT/vmm.log" || true)
rig_check "guest eject: the VMM parked the igb without a remove-device (parked $parks times: API + guest)" \
  test "$parks" = 2 || true
asked=$(grep -c 'vfio0 (.*): the guest ejected it .* after the request' "$RIG_OUT/vmm.log" || true)
rig_check "guest eject: one of the two ejects was asked by remove-device, the other was the guest's own ($asked asked)" \
  test "$asked" = 1 || true
rig_grep "cold-plugged: nothing left at exit" "$RIG_OUT/vmm.log" '0 container\(s\), 0 BAR slot\(s\) and 0 VFIO fd\(s\) left' || true
