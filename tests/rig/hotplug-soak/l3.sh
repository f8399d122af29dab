# shellcheck shell=sh
# The level-3 side of `hotplug-soak`: the igb driver is loaded; for each cycle, wait for the igb to arrive and
# bind, then to leave. Sourced by resources/guest-init as /test.sh; it then powers off.
. /hp-lib.sh
modprobe igb || true
echo "RIG-HP: ready"
n=1
while [ $n -le "${HP_CYCLES:-20}" ]; do
  hp_round $n bindonly
  hp_wait_gone $n
  n=$((n + 1))
done
# Level 2 reads its counters now; it plugs the igb once more when it is done, which is level 3's cue to finish.
hp_round $n noping
echo "RIG-HP: level 3 done"
