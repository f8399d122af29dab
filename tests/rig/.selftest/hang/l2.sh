# shellcheck shell=sh
# a guest that hangs: the rig must stop it at the time limit and say so
echo about to hang
sleep 1000
