# shellcheck shell=sh
# a scenario that checks nothing fails
true
