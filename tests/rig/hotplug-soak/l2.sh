# shellcheck shell=sh
# 20 add/remove cycles of the igb: the VMM's fds, RSS, DMA mappings, containers, BAR slots and GSIs do not grow
# Runs at level 2 after the rig's set-up (docs/rig.md). Each check prints RIG-RESULT PASS/FAIL.
. /rig/hp-l2-lib.sh
CYCLES=20

hp_start_vmm 1300 --kernel "$RIG_L3_KERNEL" --initramfs "$RIG_L3_INITRD" --cmdline "$RIG_L3_CMDLINE" \
  --cpus boot=1 --memory size=256M,hugepages=on
rig_check "level 3 booted" hp_wait_l3 'RIG-HP: ready' 300 || true
pid=$(hp_vmm_pid)
# The fewest fds over half a second: the API server closes a finished connection when it reads the
# client's end of stream, which can come just after the client returned.
fds() {
  _min=100000
  for _k in 1 2 3 4 5; do
    _c=$(ls "/proc/$pid/fd" | wc -l)
    [ "$_c" -lt "$_min" ] && _min=$_c
    sleep 0.1
  done
  echo "$_min"
}
rss() { awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status"; }
echo "vmm pid $pid: before any device: $(fds) fds, RSS $(rss) KiB"

failed_cycles=0
n=1
while [ $n -le $CYCLES ]; do
  t0=$(cut -d' ' -f1 /proc/uptime)
  ok=1
  remote add-device "path=$RIG_NIC_SYSFS,id=nic0" >"$RIG_OUT/add.out" 2>&1 || ok=0
  hp_wait_l3 "RIG-HP: round $n done" 300 || ok=0
  remote remove-device nic0 --timeout 180 >"$RIG_OUT/rm.out" 2>&1 || ok=0
  grep -q '"state": "parked"' "$RIG_OUT/rm.out" || ok=0
  hp_wait_l3 "RIG-HP: gone $n" 200 || ok=0
  remote info >"$RIG_OUT/info-$n.out" 2>&1 || ok=0
  f=$(fds)
  r=$(rss)
  echo "RIG-L2: cycle $n: ok=$ok fds $f RSS $r KiB live_mapped_bytes $(hp_num "$RIG_OUT/info-$n.out" live_mapped_bytes) map/unmap calls $(hp_num "$RIG_OUT/info-$n.out" map_calls)/$(hp_num "$RIG_OUT/info-$n.out" unmap_calls) bar_slots $(hp_num "$RIG_OUT/info-$n.out" bar_slots) msi_gsis $(hp_num "$RIG_OUT/info-$n.out" msi_gsis) ($(awk -v a="$t0" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN { printf "%.1f", b - a }') s)"
  if [ "$ok" != 1 ]; then
    failed_cycles=$((failed_cycles + 1))
    cat "$RIG_OUT/add.out" "$RIG_OUT/rm.out"
    break
  fi
  eval "fds_$n=$f rss_$n=$r"
  n=$((n + 1))
done
rig_check "all $CYCLES add/remove cycles completed ($failed_cycles failed)" test "$failed_cycles" = 0 -a $n -gt $CYCLES || true
last=$((n - 1))
[ $last -ge 2 ] || last=2
eval "f1=\${fds_1:-0} f2=\${fds_2:-0} fl=\${fds_$last:-0} r2=\${rss_2:-0} rl=\${rss_$last:-0}"
rig_check "open fds do not grow (after cycle 1: $f1, cycle 2: $f2, cycle $last: $fl)" test "$fl" -le "$f1" -a "$f2" -le "$f1" || true
rig_check "RSS does not grow (cycle 2: $r2 KiB, cycle $last: $rl KiB; at most 2 MiB of allocator noise)" \
  test "$rl" -le $((r2 + 2048)) || true
i=$last
rig_check "no DMA mapping left after the last cycle (live_mapped_bytes 0)" \
  test "$(hp_num "$RIG_OUT/info-$i.out" live_mapped_bytes)" = 0 || true
rig_check "every map call was undone (map calls = unmap calls = $CYCLES)" \
  test "$(hp_num "$RIG_OUT/info-$i.out" map_calls)" = $CYCLES -a "$(hp_num "$RIG_OUT/info-$i.out" unmap_calls)" = $CYCLES || true
rig_check "one container (the parked igb's, empty)" test "$(hp_num "$RIG_OUT/info-$i.out" open_containers)" = 1 || true
rig_check "no KVM BAR slot left" test "$(hp_num "$RIG_OUT/info-$i.out" bar_slots)" = 0 || true
rig_check "no MSI GSI / irqfd left" test "$(hp_num "$RIG_OUT/info-$i.out" msi_gsis)" = 0 || true
rig_check "at most three VFIO fds (the parked igb's container, group and device)" \
  test "$(hp_num "$RIG_OUT/info-$i.out" vfio_fds)" -le 3 || true
cat "$RIG_OUT/info-$i.out"

# Plug it once more: level 3's cue to finish (it waits for the igb after the last cycle).
remote add-device "path=$RIG_NIC_SYSFS" >/dev/null 2>&1 || true
rig_check "level 3 ran to its end" hp_wait_l3 'RIG-HP: level 3 done' 200 || true
hp_wait_vmm
rig_check "vmm exits 0 after level 3 powers off (exit $HP_VMM_RC)" test "$HP_VMM_RC" = 0 || true
rig_grep "nothing left at exit" "$RIG_OUT/vmm.log" '0 container\(s\), 0 BAR slot\(s\) and 0 VFIO fd\(s\) left' || true
