# shellcheck shell=sh
# a failing common set-up is reported as such, and l2.sh does not run
rig_pass should not run
