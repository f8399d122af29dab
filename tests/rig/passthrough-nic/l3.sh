# shellcheck shell=sh
# The level-3 test of passthrough-nic: the passed-through igb binds, links, pings the gateway with MSI-X.
# Sourced by resources/guest-init as /test.sh (rig_check/rig_pass/rig_fail come from there); it then powers off.
igb=""
for d in /sys/bus/pci/devices/*; do
  echo "level 3: PCI $(basename "$d") $(cat "$d/vendor"):$(cat "$d/device") class $(cat "$d/class")"
  [ "$(cat "$d/vendor"):$(cat "$d/device")" = 0x8086:0x10c9 ] && igb=$d
done
rig_check "level 3 sees the igb (8086:10c9) on its PCI bus" test -n "$igb" || true
modprobe igb || true
sleep 1
drv=$(basename "$(readlink "$igb/driver" 2>/dev/null)" 2>/dev/null)
rig_check "the igb driver binds it (driver: $drv)" test "$drv" = igb || true
dmesg | grep -iE 'igb|msi' | head -8
# Where level 3's kernel put the igb's BARs (resource flags: 0x200 memory, 0x100000 64-bit).
bar=0; unplaced=0; wide=0
while [ $bar -lt 6 ] && read -r start end flags; do
  if [ $((flags & 0x200)) != 0 ]; then
    echo "level 3: igb BAR $bar: $start-$end flags $flags"
    [ $((start)) = 0 ] && unplaced=$((unplaced + 1))
    [ $((flags & 0x100000)) != 0 ] && wide=$((wide + 1))
  fi
  bar=$((bar + 1))
done <"$igb/resource"
rig_check "every memory BAR of the igb has a guest address ($wide of them 64-bit)" test "$unplaced" = 0 || true
ifc=$(ls "$igb/net" 2>/dev/null | head -n1)
rig_check "it has a network interface ($ifc)" test -n "$ifc" || true
ip link set "$ifc" up
ip addr add 10.0.2.15/24 dev "$ifc"
i=0
while [ "$(cat "/sys/class/net/$ifc/carrier" 2>/dev/null)" != 1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
rig_check "the link comes up" test "$(cat "/sys/class/net/$ifc/carrier" 2>/dev/null)" = 1 || true
irqs() { grep "$ifc" /proc/interrupts | awk '{ s += $2 } END { print s + 0 }'; }
grep -E "$ifc|MSI" /proc/interrupts
before=$(irqs)
ping -c 3 -W 3 10.0.2.2 >/tmp/ping.txt 2>&1 || true
cat /tmp/ping.txt
rig_check "3 of 3 pings to 10.0.2.2 are answered" grep -q '3 packets transmitted, 3 packets received' /tmp/ping.txt || true
after=$(irqs)
grep -E "$ifc" /proc/interrupts
rig_check "the igb's MSI-X interrupt counts rise ($before -> $after)" test "$after" -gt "$before" || true
rig_check "its interrupts are MSI-X" grep -q 'PCI-MSIX' /proc/interrupts || true
