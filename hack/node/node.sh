#!/usr/bin/env bash
# Host-level plumbing of the local test cluster: a bridge holding the API server's and the nodes'
# addresses, the DNAT that gives pods the `kubernetes` Service, and real nodes (containerd + kubelet)
# each in its own mount namespace and cgroup root. Every change to the host is journaled in
# DIR/undo as the command that reverts it; `down` kills what runs and replays the journal backwards,
# so a teardown leaves no bridge, address, route, iptables rule, cgroup, mount, directory or sysctl
# behind, also after a crashed test (run it again on the same DIR).
#
# Why a mount namespace per node: two kubelets on one machine must not share the host paths that
# node-level software expects to own (/run/containerd, /run/stasis, /var/lib/kubelet …). Inside its
# namespace each node sees its own folders there, bind-mounted from DIR/nodes/NAME, so hostPath
# volumes (the agent's CRI socket, the launcher socket) are per node exactly as on real machines,
# while everything else (/tmp, /sys, binaries) is the host's. The namespace, and every mount the
# kubelet and containerd make in it, disappears with the node's last process.
#
# Usage (tests/cluster/node.go drives it; `make down` calls `down`):
#   node.sh net-up   DIR BRIDGE ADDR/PREFIX SERVICE_CIDR
#   node.sh dnat     DIR SERVICE_IP:PORT TARGET_IP:PORT
#   node.sh node-up  DIR NAME          (reads DIR/nodes/NAME/node.env, written by node.go)
#   node.sh import   DIR NAME TARBALL...
#   node.sh node-down DIR NAME
#   node.sh down     DIR
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self="$here/node.sh"
# Node paths that become private per node (inside the node's mount namespace).
node_paths=(/run/containerd /run/stasis /run/netns /var/lib/kubelet /var/lib/containerd /var/lib/cni /etc/cni/net.d /opt/containerd /var/log/pods /var/log/containers)
tag=stasis-local-cluster

die() { echo "node.sh: $*" >&2; exit 1; }
# record CMD: appends the command that undoes a change to the journal (replayed last-first).
record() { printf '%s\n' "$*" >>"$DIR/undo"; }

# mkdir_recorded PATH: creates PATH and its missing parents, journaling each one it created.
mkdir_recorded() {
  local p=$1 missing=()
  while [ ! -e "$p" ]; do missing=("$p" "${missing[@]}"); p=$(dirname "$p"); done
  for p in "${missing[@]}"; do
    if mkdir "$p" 2>/dev/null; then record "rmdir '$p'"; fi
  done
}

cgroup_hierarchies() {
  local h
  for h in /sys/fs/cgroup/*; do [ -f "$h/cgroup.procs" ] && echo "$h"; done
}

# cg_pids ROOT: every PID in the cgroup subtree ROOT (relative to each hierarchy), all hierarchies.
cg_pids() {
  local h
  for h in $(cgroup_hierarchies); do
    if [ -d "$h$1" ]; then find "$h$1" -name cgroup.procs -exec cat {} + 2>/dev/null || true; fi
  done | sort -un
}

# kill_cgroup ROOT: freezes the subtree (so nothing forks or restarts meanwhile), SIGKILLs every
# process in it, thaws, and waits until it is empty.
kill_cgroup() {
  local root=$1 fz=/sys/fs/cgroup/freezer$1 i pids
  [ -d "$fz" ] && echo FROZEN >"$fz/freezer.state" 2>/dev/null || true
  for i in $(seq 1 100); do
    pids=$(cg_pids "$root")
    [ -z "$pids" ] && break
    kill -9 $pids 2>/dev/null || true
    [ -d "$fz" ] && echo THAWED >"$fz/freezer.state" 2>/dev/null || true
    sleep 0.1
  done
  pids=$(cg_pids "$root")
  [ -z "$pids" ] || echo "node.sh: processes left in cgroup $root: $pids" >&2
}

cmd_net_up() {
  local br=$1 addr=$2 svc=$3 s
  mkdir -p "$DIR"
  # The kubelet and the CNI bridge plugin change these; give them back afterwards.
  for s in net.ipv4.ip_forward vm.overcommit_memory kernel.panic kernel.panic_on_oops; do
    record "sysctl -qw $s=$(sysctl -n $s)"
  done
  # The controller-manager's host-path provisioner keeps its volumes in /tmp/hostpath_pv.
  [ -e /tmp/hostpath_pv ] || record "rm -rf /tmp/hostpath_pv"
  ip link show "$br" >/dev/null 2>&1 && die "bridge $br exists already (another cluster, or run: node.sh down DIR)"
  ip link add "$br" type bridge
  record "ip link del '$br'"
  ip addr add "$addr" dev "$br"
  ip link set "$br" up
  # Host traffic to Service IPs stays on the bridge (the DNAT rules below rewrite it).
  ip route add "$svc" dev "$br"
  sysctl -qw net.ipv4.ip_forward=1
}

cmd_dnat() {
  local from=$1 to=$2 chain rule
  for chain in OUTPUT PREROUTING; do
    rule=(-t nat "-A" "$chain" -d "${from%:*}/32" -p tcp --dport "${from##*:}" -m comment --comment "$tag" -j DNAT --to-destination "$to")
    iptables -w "${rule[@]}"
    rule[2]=-D
    record "iptables -w ${rule[*]}"
  done
}

cmd_node_up() {
  local name=$1 nd="$DIR/nodes/$1" p h holder i sock
  [ -f "$nd/node.env" ] || die "$nd/node.env missing"
  # shellcheck disable=SC1091
  . "$nd/node.env" # NODE_IP NODE_PREFIX BRIDGE CGROUP_ROOT KUBELET CONTAINERD_CONFIG KUBELET_CONFIG KUBELET_KUBECONFIG
  mkdir -p "$nd/logs" "$nd/pids"
  ip addr add "$NODE_IP/$NODE_PREFIX" dev "$BRIDGE"
  record "ip addr del '$NODE_IP/$NODE_PREFIX' dev '$BRIDGE'"
  # The CNI bridge plugin creates the pod bridge with the first pod; it goes with the node.
  record "ip link del '$CNI_BRIDGE' 2>/dev/null"

  # A cgroup root in every v1 hierarchy (kubelet's cgroupRoot must exist everywhere); cpuset needs
  # its cpus and mems before anything can join.
  for h in $(cgroup_hierarchies); do
    mkdir -p "$h$CGROUP_ROOT/system"
    if [ -f "$h/cpuset.cpus" ]; then
      for p in "$CGROUP_ROOT" "$CGROUP_ROOT/system"; do
        cat "$h/cpuset.cpus" >"$h$p/cpuset.cpus"
        cat "$h/cpuset.mems" >"$h$p/cpuset.mems"
      done
    fi
  done
  record "cmd_rm_cgroup '$CGROUP_ROOT'"
  record "kill_cgroup '$CGROUP_ROOT'"

  # Mount points for the per-node folders (only the ones the host lacks are created, and removed).
  for p in "${node_paths[@]}"; do
    mkdir_recorded "$p"
    mkdir -p "$nd/root$p"
  done

  # The namespace holder: makes the bind mounts, then sleeps; containerd and the kubelet join it.
  setsid unshare --mount --propagation slave -- "$self" ns-init "$nd" "$CGROUP_ROOT" \
    >>"$nd/logs/holder.log" 2>&1 </dev/null &
  holder=$!
  echo "$holder" >"$nd/pids/holder.pid"
  for i in $(seq 1 100); do [ -f "$nd/ns-ready" ] && break; sleep 0.05; done
  [ -f "$nd/ns-ready" ] || die "mount namespace of $name not ready: $(tail -5 "$nd/logs/holder.log")"

  run_in_node "$nd" containerd containerd --config "$CONTAINERD_CONFIG"
  sock="$nd/root/run/containerd/containerd.sock"
  for i in $(seq 1 200); do
    ctr -a "$sock" version >/dev/null 2>&1 && break
    sleep 0.05
  done
  ctr -a "$sock" version >/dev/null 2>&1 || die "containerd of $name did not start: $(tail -5 "$nd/logs/containerd.log")"
  if [ -n "${IMAGES:-}" ]; then
    # shellcheck disable=SC2086
    cmd_import "$name" $IMAGES
  fi
  run_in_node "$nd" kubelet "$KUBELET" --config="$KUBELET_CONFIG" --kubeconfig="$KUBELET_KUBECONFIG" \
    --hostname-override="$name" --node-ip="$NODE_IP" --v="${KUBELET_VERBOSITY:-1}"
}

# run_in_node ND NAME BIN ARGS...: starts BIN in the node's mount namespace and system cgroup,
# detached (it outlives the caller: `make demo` leaves the cluster up), PID in ND/pids/NAME.pid.
run_in_node() {
  local nd=$1 name=$2
  shift 2
  setsid nsenter -t "$(cat "$nd/pids/holder.pid")" -m -- "$self" exec-in-cgroup "$CGROUP_ROOT/system" "$@" \
    >>"$nd/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$nd/pids/$name.pid"
}

# ns-init ND CGROUP_ROOT: runs as the holder inside the new mount namespace.
cmd_ns_init() {
  local nd=$1 p
  join_cgroup "$2/system"
  for p in "${node_paths[@]}"; do mount --bind "$nd/root$p" "$p"; done
  : >"$nd/ns-ready"
  exec sleep infinity
}

join_cgroup() {
  local h
  for h in $(cgroup_hierarchies); do echo $$ >"$h$1/cgroup.procs"; done
}

cmd_exec_in_cgroup() {
  join_cgroup "$1"
  shift
  exec "$@"
}

cmd_import() {
  local name=$1 nd="$DIR/nodes/$1" t
  shift
  for t in "$@"; do
    ctr -a "$nd/root/run/containerd/containerd.sock" -n k8s.io images import --no-unpack=false "$t" >/dev/null ||
      die "import $t into $name failed"
  done
}

cmd_node_down() {
  local nd="$DIR/nodes/$1"
  [ -f "$nd/node.env" ] || return 0
  . "$nd/node.env"
  # The kubelet, containerd, the shims and every container are in the node's cgroup root: frozen
  # together and killed together, nothing gets restarted meanwhile (test data needs no grace).
  kill_cgroup "$CGROUP_ROOT"
  rm -f "$nd"/pids/*.pid "$nd/ns-ready"
}

# alive PID: the process exists and is not a zombie (an exited child its parent has not reaped yet).
alive() {
  local st
  st=$(cut -d' ' -f3 2>/dev/null </proc/"$1"/stat) || return 1
  [ -n "$st" ] && [ "$st" != Z ]
}

# stop_control_plane: the processes tests/cluster started (DIR/pids/<binary>.pid), SIGKILLed at once:
# this cluster's data is thrown away, and the API server's graceful shutdown takes many seconds. A
# PID is signalled only while it still runs that binary (never a recycled PID).
stop_control_plane() {
  local b f pid i
  for b in kube-scheduler kube-controller-manager kube-apiserver etcd; do
    f="$DIR/pids/$b.pid"
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    if [ "$(basename "$(tr '\0' '\n' 2>/dev/null <"/proc/$pid/cmdline" | head -1)")" = "$b" ]; then
      kill -KILL "$pid" 2>/dev/null || true
      for i in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
    fi
    rm -f "$f"
  done
}

cmd_down() {
  local n line
  [ -d "$DIR" ] || return 0
  if [ -d "$DIR/nodes" ]; then
    for n in "$DIR"/nodes/*/; do [ -d "$n" ] && cmd_node_down "$(basename "$n")" & done
    wait
  fi
  stop_control_plane
  if [ -f "$DIR/undo" ]; then
    tac "$DIR/undo" | while IFS= read -r line; do
      eval "$line" >/dev/null 2>&1 || true
    done
    rm -f "$DIR/undo"
  fi
  check_clean
}

# check_clean: reports what a teardown left behind (nothing, normally).
check_clean() {
  local left=""
  iptables -w -t nat -S 2>/dev/null | grep -q -- "$tag" && left="$left iptables-rules"
  if [ -d "$DIR/nodes" ]; then
    local n
    for n in "$DIR"/nodes/*/; do
      [ -f "$n/node.env" ] || continue
      (
        . "$n/node.env"
        ip link show "$CNI_BRIDGE" >/dev/null 2>&1 && echo "node.sh: bridge $CNI_BRIDGE left" >&2
        [ -d "/sys/fs/cgroup/pids$CGROUP_ROOT" ] && echo "node.sh: cgroup $CGROUP_ROOT left" >&2
        true
      )
    done
  fi
  [ -z "$left" ] || echo "node.sh: left behind:$left" >&2
}

cmd_rm_cgroup() {
  local h
  for h in $(cgroup_hierarchies); do
    [ -d "$h$1" ] && find "$h$1" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  return 0
}

[ $# -ge 1 ] || die "usage: node.sh net-up|dnat|node-up|import|node-down|down DIR ..."
sub=$1
shift
case $sub in
ns-init) cmd_ns_init "$@" ;;
exec-in-cgroup) cmd_exec_in_cgroup "$@" ;;
kill-cgroup) kill_cgroup "$@" ;;
rm-cgroup) cmd_rm_cgroup "$@" ;;
net-up | dnat | node-up | import | node-down | down)
  [ $# -ge 1 ] || die "$sub: DIR missing"
  DIR=$(realpath -m "$1")
  shift
  "cmd_${sub//-/_}" "$@"
  ;;
*) die "unknown command $sub" ;;
esac
