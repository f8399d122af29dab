# shellcheck shell=sh
# vmm boots the Debian kernel at level 3 (2 vCPUs, 512 MiB; 4K pages, hugepages); guest agrees; exit 0 (2 on reboot)
# Runs at level 2 after the rig's set-up (docs/rig.md). Each check prints RIG-RESULT PASS/FAIL.

# boot_once LABEL MEMORY-ARG: one boot of level 3; checks the exit status, the marker and the poweroff, and
# prints the boot time (vmm start to the level-3 marker; nested TCG: a correctness run, not a benchmark).
boot_once() {
  label=$1
  mem=$2
  rm -f "$RIG_OUT/marker.t" "$RIG_OUT/l3-console.log"
  # Watch for the marker (rig_vmm recreates l3-console.log when it starts vmm).
  (
    while ! grep -q 'RIG-BOOT-MARKER' "$RIG_OUT/l3-console.log" 2>/dev/null; do sleep 0.05; done
    cut -d' ' -f1 /proc/uptime >"$RIG_OUT/marker.t"
  ) &
  watcher=$!
  t0=$(cut -d' ' -f1 /proc/uptime)
  rc=0
  rig_vmm -t 150 --kernel "$RIG_L3_KERNEL" --initramfs "$RIG_L3_INITRD" --cmdline "$RIG_L3_CMDLINE" \
    --cpus boot=2 --memory "$mem" -v || rc=$?
  kill "$watcher" 2>/dev/null || true
  rig_check "$label: vmm exits 0 after the guest powers off (exit $rc)" test "$rc" = 0 || true
  rig_grep "$label: level 3 printed its marker" "$RIG_OUT/l3-console.log" 'RIG-BOOT-MARKER' || true
  rig_grep "$label: level 3's test ran to the end and it powered off" "$RIG_OUT/l3-console.log" \
    'RIG-GUEST: test.sh exited 0' || true
  rig_grep "$label: vmm logged the poweroff" "$RIG_OUT/vmm.log" 'VM ended after .*PowerOff' || true
  if [ -s "$RIG_OUT/marker.t" ]; then
    t1=$(cat "$RIG_OUT/marker.t")
    echo "RIG-L2: boot time ($label, vmm start to level-3 marker): $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') s (nested under TCG: correctness only)"
  fi
  cp "$RIG_OUT/l3-console.log" "$RIG_OUT/l3-console-$label.log"
}

boot_once "4K pages" "size=512M"
hp_before=$(awk '/^HugePages_Free:/ { print $2 }' /proc/meminfo)
echo "RIG-L2: free hugepages before the hugepages=on boot: $hp_before"
boot_once "hugepages" "size=512M,hugepages=on"

# A guest reboot ends vmm with status 2 (iovmm does not restart guests), not 0.
rc=0
rig_vmm -t 150 --kernel "$RIG_L3_KERNEL" --initramfs "$RIG_L3_INITRD" --cmdline "$RIG_L3_CMDLINE rig.reboot" \
  --cpus boot=2 --memory size=512M || rc=$?
rig_check "a guest reboot ends vmm with status 2 (exit $rc)" test "$rc" = 2 || true
rig_grep "and vmm says why" "$RIG_OUT/vmm.log" 'the guest reset' || true

# To a shell: busybox sh as init, fed through vmm's stdin (the serial console's input). The command is
# typed until its answer shows (the 8250 driver may flush input that arrives before it is ready); the
# answer is computed by the guest's shell, so it proves input reached it. Then the shell powers off.
rm -f "$RIG_OUT/in.fifo" "$RIG_OUT/l3-console.log"
mkfifo "$RIG_OUT/in.fifo"
(
  i=0
  while [ $i -lt 40 ] && ! grep -q '^SHELL-42' "$RIG_OUT/l3-console.log" 2>/dev/null; do
    printf 'echo SHELL-$((6*7))\n'
    sleep 3
    i=$((i + 1))
  done
  printf '/bin/busybox poweroff -f\n'
  sleep 30
) >"$RIG_OUT/in.fifo" &
typist=$!
rc=0
rig_vmm -t 150 --kernel "$RIG_L3_KERNEL" --initramfs "$RIG_L3_INITRD" \
  --cmdline "console=ttyS0 panic=-1 quiet rdinit=/bin/busybox -- sh" --cpus boot=2 --memory size=512M \
  <"$RIG_OUT/in.fifo" || rc=$?
kill "$typist" 2>/dev/null || true
rig_grep "shell: the guest's shell answered a command typed on vmm's stdin" "$RIG_OUT/l3-console.log" '^SHELL-42' || true
rig_check "shell: poweroff from the shell ends vmm with status 0 (exit $rc)" test "$rc" = 0 || true

# A request the host cannot serve is a clear error, not a crash.
echo 0 >/proc/sys/vm/nr_hugepages
rc=0
"$VMM" --kernel "$RIG_L3_KERNEL" --initramfs "$RIG_L3_INITRD" --memory size=512M,hugepages=on \
  >"$RIG_OUT/nohp.out" 2>"$RIG_OUT/nohp.err" || rc=$?
cat "$RIG_OUT/nohp.err"
rig_check "hugepages=on without free huge pages exits 1 (exit $rc)" test "$rc" = 1 || true
rig_grep "and says how to fix it" "$RIG_OUT/nohp.err" 'nr_hugepages' || true
