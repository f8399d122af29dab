#!/bin/sh
# host side: the scenario log folder is $1
grep -q "RIG-RESULT PASS x" "$1/l2-console.log" || { echo "no PASS x"; exit 1; }
echo "the console has no NOPE"
exit 1
