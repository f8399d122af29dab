# shellcheck shell=sh
# The level-3 test: print the marker, check CPUs, memory and the PCI host bridge against what vmm was asked.
# Sourced by resources/guest-init as /test.sh (rig_check/rig_pass/rig_fail come from there); it then powers off.
echo "RIG-BOOT-MARKER level 3 up at $(cut -d' ' -f1 /proc/uptime) s"
ncpu=$(grep -c '^processor' /proc/cpuinfo)
echo "level 3: $ncpu processors; $(grep -m1 '^model name' /proc/cpuinfo)"
rig_check "level 3 sees 2 CPUs in /proc/cpuinfo (saw $ncpu)" test "$ncpu" = 2 || true
online=$(cat /sys/devices/system/cpu/online)
rig_check "both CPUs are online ($online)" test "$online" = 0-1 || true
memkb=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)
echo "level 3: MemTotal $memkb kB"
# 512 MiB asked: MemTotal is what is left after the kernel's own reservations (it is never above 512 MiB).
rig_check "MemTotal ($memkb kB) agrees with 512 MiB" test "$memkb" -gt 430000 -a "$memkb" -le 524288 || true
rig_check "the PCI host bridge 00:00.0 is seen" test -e /sys/bus/pci/devices/0000:00:00.0 || true
echo "level 3: PCI $(cat /sys/bus/pci/devices/0000:00:00.0/vendor 2>/dev/null):$(cat /sys/bus/pci/devices/0000:00:00.0/device 2>/dev/null)"
rig_check "ACPI is on (the MADT and DSDT were read)" test -e /sys/firmware/acpi/tables/DSDT || true
# The console's interrupt (GSI 4) comes through a KVM irqfd; the guest must have taken some (tty output
# uses THRE interrupts unless the port fell back to polling, which /proc/tty/driver/serial shows as irq:0).
echo "level 3: $(grep -m1 '^0:' /proc/tty/driver/serial)"
irqline=$(grep -m1 'ttyS0' /proc/interrupts || true)
echo "level 3: /proc/interrupts: $irqline"
irqn=$(echo "$irqline" | awk '{ n = 0; for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) n += $i; print n }')
rig_check "the console's interrupt was delivered (count ${irqn:-none})" test "${irqn:-0}" -gt 0 || true
# The wall clock comes from the CMOS RTC (the host's time): not 1970, and /dev/rtc0 (rtc_cmos) agrees.
rig_check "the guest's clock comes from the RTC ($(date -u +%F))" test "$(date -u +%Y)" -ge 2025 || true
rig_check "rtc0 exists and agrees (rtc0: $(cat /sys/class/rtc/rtc0/date 2>/dev/null))" \
  test "$(cat /sys/class/rtc/rtc0/date 2>/dev/null)" = "$(date -u +%F)" || true
echo "level 3: selected kernel messages:"
dmesg | grep -iE 'ttyS|8250|serial|pnp|mmconf|ecam|PCI: Using|ACPI: (FACP|APIC|MCFG|DSDT)|clocksource: Switched|smpboot: Total|x86/cpu|Firmware Bug|unchecked MSR|WARNING' \
  | head -n 30 | sed 's/^/  dmesg: /'
if grep -q 'rig.reboot' /proc/cmdline; then
  echo "level 3: rig.reboot on the command line: rebooting instead of powering off"
  reboot -f
fi
