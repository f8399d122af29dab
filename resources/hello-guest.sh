# shellcheck shell=sh
# The default guest test (resources/guest-image): say hello, show what the guest sees, power off.
echo "hello from the guest: $(uname -r), $(grep -c '^processor' /proc/cpuinfo) CPU(s), $(awk '/^MemTotal:/ { print $2 }' /proc/meminfo) kB"
for d in /sys/bus/pci/devices/*; do
  [ -e "$d" ] && echo "pci $(basename "$d") $(cat "$d/vendor"):$(cat "$d/device") class $(cat "$d/class")"
done
rig_pass "the guest ran its test"
