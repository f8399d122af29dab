# shellcheck shell=sh
echo "level 3 would run this"
