# shellcheck shell=sh
# The level-3 side of `unplug-blocks-dma`: no igb driver is loaded (the VMM drives the NIC itself); waits for
# the igb to arrive and to leave. Sourced by resources/guest-init as /test.sh; it then powers off.
. /hp-lib.sh
echo "RIG-HP: ready"
hp_round 1 noping
hp_wait_gone 1
# Level 2 tests the parked igb now; it plugs it again when it is done, which is level 3's cue to finish.
hp_round 2 noping
echo "RIG-HP: level 3 done"
