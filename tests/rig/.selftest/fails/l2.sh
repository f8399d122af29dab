# shellcheck shell=sh
# failed checks: the first one is the reason, the others are counted
rig_pass one
rig_fail "two went wrong"
rig_fail three
