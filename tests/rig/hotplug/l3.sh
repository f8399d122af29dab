# shellcheck shell=sh
# The level-3 side of `hotplug`: waits for the igb to arrive (ACPI hotplug), binds it, pings; waits for it to
# leave; waits for it to come back and pings again. Progress markers (RIG-HP: ...) tell level 2 when to act.
# Sourced by resources/guest-init as /test.sh (rig_check/rig_pass/rig_fail come from there); it then powers off.
. /hp-lib.sh
echo "RIG-HP: level 3 up; acpiphp slots: $(ls /sys/bus/pci/slots 2>/dev/null | tr '\n' ' ')"
rig_check "level 3 has ACPI hotplug slots (/sys/bus/pci/slots)" test -n "$(ls /sys/bus/pci/slots 2>/dev/null)" || true
modprobe igb || true
if grep -q rig.coldplug /proc/cmdline; then
  # Second boot: the igb was given with --device; it is there from the start and removed through the API.
  echo "RIG-HP: ready"
  hp_round 1
  hp_wait_gone 1
  # Added again through the API; then level 3 ejects it itself (acpiphp slot power off -> _EJ0).
  hp_round 2 bindonly
  addr=$(basename "$igb" | cut -d. -f1)
  slot=""
  for s in /sys/bus/pci/slots/*; do
    [ "$(cat "$s/address" 2>/dev/null)" = "$addr" ] && slot=$s
  done
  rig_check "round 2: the igb's hotplug slot is $slot" test -n "$slot" || true
  [ -n "$slot" ] && echo 0 >"$slot/power"
  hp_wait_gone 2
  echo "RIG-HP: level 3 done"
  exit 0
fi
rig_check "no igb at boot" sh -c '! hp_find_igb_cmd' || true
echo "RIG-HP: ready"
hp_round 1
hp_wait_gone 1
hp_round 2
hp_wait_gone 2
echo "RIG-HP: level 3 done"
