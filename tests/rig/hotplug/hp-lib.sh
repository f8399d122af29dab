# shellcheck shell=sh
# Level-3 helpers shared by the hotplug scenarios (installed as /hp-lib.sh).

# hp_find_igb: prints the sysfs folder of the igb (8086:10c9), fails if there is none.
hp_find_igb() {
  for _d in /sys/bus/pci/devices/*; do
    [ -e "$_d/vendor" ] || continue
    if [ "$(cat "$_d/vendor"):$(cat "$_d/device")" = 0x8086:0x10c9 ]; then
      echo "$_d"
      return 0
    fi
  done
  return 1
}
# hp_find_igb_cmd: the same as a command for `sh -c` (functions are not exported).
cat >/bin/hp_find_igb_cmd <<'X'
#!/bin/sh
for d in /sys/bus/pci/devices/*; do
  [ "$(cat "$d/vendor" 2>/dev/null):$(cat "$d/device" 2>/dev/null)" = 0x8086:0x10c9 ] && exit 0
done
exit 1
X
chmod +x /bin/hp_find_igb_cmd

# hp_wait_igb SECONDS: waits for the igb to appear; sets $igb.
hp_wait_igb() {
  _i=0
  igb=""
  while [ $_i -lt $(($1 * 10)) ]; do
    igb=$(hp_find_igb) && return 0
    sleep 0.1
    _i=$((_i + 1))
  done
  return 1
}

# hp_round N [noping|bindonly]: waits for the hot-added igb, checks the driver binds, the link comes up and
# 3/3 pings answer, then prints "RIG-HP: round N done". noping: only wait for the igb; bindonly: and its driver.
hp_round() {
  _n=$1
  hp_wait_igb 300 || true
  rig_check "round $_n: the hot-added igb appears on level 3's PCI bus ($igb)" test -n "$igb" || true
  echo "RIG-HP: round $_n: igb at $igb after $(cut -d' ' -f1 /proc/uptime) s"
  if [ -n "$igb" ] && [ "$2" != noping ]; then
    _i=0
    while [ -z "$(ls "$igb/net" 2>/dev/null)" ] && [ $_i -lt 600 ]; do sleep 0.1; _i=$((_i + 1)); done
    _drv=$(basename "$(readlink "$igb/driver" 2>/dev/null)" 2>/dev/null)
    rig_check "round $_n: the igb driver binds it (driver: $_drv)" test "$_drv" = igb || true
    if [ "$2" = bindonly ]; then
      echo "RIG-HP: round $_n done"
      return 0
    fi
    ifc=$(ls "$igb/net" 2>/dev/null | head -n1)
    rig_check "round $_n: it has a network interface ($ifc)" test -n "$ifc" || true
    if [ -n "$ifc" ]; then
      ip link set "$ifc" up
      ip addr add 10.0.2.15/24 dev "$ifc" 2>/dev/null || true
      _i=0
      while [ "$(cat "/sys/class/net/$ifc/carrier" 2>/dev/null)" != 1 ] && [ $_i -lt 200 ]; do sleep 0.1; _i=$((_i + 1)); done
      rig_check "round $_n: the link comes up" test "$(cat "/sys/class/net/$ifc/carrier" 2>/dev/null)" = 1 || true
      ping -c 3 -W 3 10.0.2.2 >/tmp/ping.txt 2>&1 || true
      cat /tmp/ping.txt
      rig_check "round $_n: 3 of 3 pings to 10.0.2.2 are answered" \
        grep -q '3 packets transmitted, 3 packets received' /tmp/ping.txt || true
      grep -E "$ifc" /proc/interrupts | head -3
    fi
  fi
  echo "RIG-HP: round $_n done"
}

# hp_wait_gone N: waits (up to 300 s) for the igb to leave level 3's bus, checks, prints "RIG-HP: gone N".
hp_wait_gone() {
  _i=0
  while hp_find_igb >/dev/null && [ $_i -lt 3000 ]; do sleep 0.1; _i=$((_i + 1)); done
  rig_check "after remove-device #$1 the igb is no longer on level 3's PCI bus" sh -c '! hp_find_igb_cmd' || true
  ls /sys/bus/pci/devices | tr '\n' ' '
  echo
  dmesg | grep -iE 'acpiphp|pci 0000:00:0[1-9]|igb' | tail -n 6
  echo "RIG-HP: gone $1"
}
