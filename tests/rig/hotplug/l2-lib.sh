# shellcheck shell=sh
# Level-2 helpers of the hotplug scenarios: vmm in the background with an API socket, `vmm remote`, and
# waiting for level 3's progress markers (RIG-HP: ...) on its console. Sourced by their l2.sh.

HP_SOCK=$RIG_OUT/api.sock

# remote ARGS...: vmm remote against this scenario's VMM.
remote() { "$VMM" remote --api-socket "$HP_SOCK" "$@"; }

# hp_start_vmm SECONDS ARGS...: starts vmm ARGS --api-socket ... -v in the background (through rig_vmm, so
# the consoles are logged as usual) with a time limit, and waits until its API answers.
hp_start_vmm() {
  _t=$1
  shift
  rm -f "$HP_SOCK" "$RIG_OUT/vmm.rc" "$RIG_OUT/l3-console.log"
  (
    _rc=0
    rig_vmm -t "$_t" "$@" --api-socket "$HP_SOCK" -v </dev/null || _rc=$?
    echo "$_rc" >"$RIG_OUT/vmm.rc"
  ) &
  HP_VMM_JOB=$!
  _i=0
  while ! remote ping >/dev/null 2>&1 && [ $_i -lt 600 ]; do
    sleep 0.1
    _i=$((_i + 1))
  done
  rig_check "the VMM's API answers ping on $HP_SOCK" remote ping
}

# hp_vmm_pid: the pid of the running vmm.
hp_vmm_pid() { pidof vmm | awk '{ print $1 }'; }

# hp_wait_l3 PATTERN SECONDS: waits until level 3's console has a line matching PATTERN (extended regex).
hp_wait_l3() {
  _i=0
  while ! grep -Eq -- "$1" "$RIG_OUT/l3-console.log" 2>/dev/null && [ $_i -lt $(($2 * 10)) ]; do
    [ -f "$RIG_OUT/vmm.rc" ] && break
    sleep 0.1
    _i=$((_i + 1))
  done
  grep -Eq -- "$1" "$RIG_OUT/l3-console.log" 2>/dev/null
}

# hp_wait_vmm: waits for vmm to end; its exit status is then in $HP_VMM_RC.
hp_wait_vmm() {
  wait "$HP_VMM_JOB" 2>/dev/null || true
  HP_VMM_RC=$(cat "$RIG_OUT/vmm.rc" 2>/dev/null || echo none)
}

# hp_num FILE KEY: the number after "KEY": in a pretty-printed JSON reply (first match).
hp_num() { sed -n "s/^ *\"$2\": \([0-9][0-9]*\),\{0,1\}\$/\1/p" "$1" | head -n1; }

# hp_try LABEL ARGS...: runs `remote ARGS`, output in $RIG_OUT/LABEL.out; status in $rc; shows the output.
hp_try() {
  _l=$1
  shift
  rc=0
  remote "$@" >"$RIG_OUT/$_l.out" 2>&1 || rc=$?
  echo "--- vmm remote $* (exit $rc):"
  cat "$RIG_OUT/$_l.out"
}
