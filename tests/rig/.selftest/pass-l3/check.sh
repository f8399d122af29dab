#!/bin/sh
# host side: what l2.sh wrote to ttyS1/ttyS2 landed in vmm.log and l3-console.log
grep -q "to the vmm log" "$1/vmm.log" || { echo "ttyS1 did not reach vmm.log"; exit 1; }
grep -q "to the l3 console" "$1/l3-console.log" || { echo "ttyS2 did not reach l3-console.log"; exit 1; }
grep -q "RIG-RESULT PASS memlock is unlimited" "$1/l2-console.log" || { echo "l2.sh did not finish its checks"; exit 1; }
echo ok
