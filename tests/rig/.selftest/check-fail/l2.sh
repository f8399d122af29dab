# shellcheck shell=sh
# a host-side check.sh that fails gives its last line as the reason
rig_pass x
