# shellcheck shell=sh
# the level-3 image and the level-2 variables are in place, and the serial logs reach the host
rig_check "the level-3 kernel is there" test -s "$RIG_L3_KERNEL"
rig_check "the level-3 initramfs is there" test -s "$RIG_L3_INITRD"
rig_check "the l2 extra file is there" test -s /rig/extra/hello.txt
rig_check "the scenario folder is the working directory" test -f ./l2.sh
rig_check "hugepages were reserved" test "$(cat /proc/sys/vm/nr_hugepages)" = 8
rig_check "memlock is unlimited" test "$(ulimit -l)" = unlimited
echo "to the vmm log" >>"$RIG_VMM_LOG_TTY"
echo "to the l3 console" >>"$RIG_L3_TTY"
rig_check "the level-3 image has the scenario's test and extra file" \
  sh -c "zcat '$RIG_L3_INITRD' | cpio -t 2>/dev/null | grep -q '^etc/hello.txt\$' && zcat '$RIG_L3_INITRD' | cpio -t 2>/dev/null | grep -q '^test.sh\$'"
