# shellcheck shell=sh
# an unchecked failing command stops l2.sh (set -e) and fails the scenario
rig_pass one
false
rig_pass never
