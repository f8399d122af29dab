# shellcheck shell=sh
# The level-3 side of `unplug-blocks-dma`: no igb driver is loaded (the VMM drives the NIC itself); waits for
# the igb to arrive and to leave. Sourced by resources/guest-init as /test.sh; it then powers off.
. /hp-lib.sh
echo "RIG-HP: ready"
hp_round 1 noping
hp_wait_gone 1
echo "RIG-HP: level 3 done"
