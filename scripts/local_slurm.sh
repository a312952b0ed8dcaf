#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for the tests and for anyone without a cluster.
#
#   scripts/local_slurm.sh start    install slurm-wlm and munge (Debian packages) if missing, write
#                                   /etc/slurm/slurm.conf for one node with this machine's CPUs and
#                                   memory, start munged, slurmctld and slurmd, wait until the node is idle
#   scripts/local_slurm.sh stop     stop the daemons that `start` started (jobs still running are killed);
#                                   daemons that were running before `start` are left alone
#   scripts/local_slurm.sh status   say whether the cluster answers
#
# `make slurm-up` and `make slurm-down` call start and stop; .ci/run does both around `make test`. The
# tests never start a cluster: they use one that answers, or skip saying how to start one.
#
# Needs root (it installs packages and writes /etc/slurm). It never overwrites a slurm.conf it did not
# write: a machine that is part of a real cluster keeps its own. No accounting database is configured,
# so `sacct` does not work here; the harness reads job states from squeue and the runs' own files.
# Finished jobs stay visible to `squeue --states=all` for MinJobAge (10 minutes); a requeued job starts
# again after about 11 s (cred_expire=10).
set -euo pipefail

STATE=${LOCAL_SLURM_DIR:-/var/tmp/local-slurm}
STARTED=$STATE/started  # the daemons this script started, one a line: what `stop` stops
CONF=/etc/slurm/slurm.conf
MARK="# written by scripts/local_slurm.sh"

die() { echo "local_slurm: $*" >&2; exit 1; }

install() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return
    command -v apt-get >/dev/null || die "slurmctld is not installed and there is no apt-get; install Slurm and munge with your package manager"
    echo "local_slurm: installing slurm-wlm and munge (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq slurm-wlm munge >/dev/null; }
}

write_conf() {
    if [ -f "$CONF" ] && ! head -1 "$CONF" | grep -qF "$MARK"; then
        die "$CONF exists and was not written by this script (a real cluster's?); not touching it"
    fi
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p /etc/slurm "$STATE/state" "$STATE/spool" "$STATE/log"
    cat > "$CONF" <<EOF
$MARK (one node: this machine)
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again once the credentials of its killed step expire; 10 s (default 120)
# keeps a preempted run's restart quick here.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=30
Waittime=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    pgrep -x munged >/dev/null && return
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R root:root /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key
    munged --force
    echo munged >> "$STARTED"
}

wait_idle() {
    for _ in $(seq 60); do
        state=$(sinfo -h -o %T 2>/dev/null | head -1 || true)
        case "$state" in
            idle|mixed|allocated) echo "local_slurm: up, node $(hostname -s) is $state ($(nproc) CPUs)"; return ;;
            drain*|down*) scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "the node did not come up; see $STATE/log/slurmctld.log and $STATE/log/slurmd.log"
}

start() {
    [ "$(id -u)" = 0 ] || die "needs root: sudo scripts/local_slurm.sh start"
    install
    write_conf
    start_munge
    for daemon in slurmctld slurmd; do
        pgrep -x "$daemon" >/dev/null || { "$daemon" && echo "$daemon" >> "$STARTED"; }
    done
    wait_idle
}

stop() {
    [ "$(id -u)" = 0 ] || die "needs root: sudo scripts/local_slurm.sh stop"
    local mine
    mine=$( { sort -u "$STARTED" 2>/dev/null || true; } | tr '\n' ' ')
    [ -n "$mine" ] || { echo "local_slurm: no daemon started by this script is recorded in $STARTED; nothing stopped"; return; }
    for daemon in $mine; do
        pkill -x "$daemon" 2>/dev/null || true
    done
    for _ in $(seq 20); do
        alive=""
        for daemon in $mine; do
            pgrep -x "$daemon" >/dev/null && alive="$alive $daemon"
        done
        [ -z "$alive" ] && { rm -f "$STARTED"; echo "local_slurm: stopped $mine"; return; }
        sleep 0.5
    done
    for daemon in $alive; do
        pkill -9 -x "$daemon" 2>/dev/null || true
    done
    rm -f "$STARTED"
    echo "local_slurm: stopped $mine(killed:$alive)"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) sinfo -h -o "%P %T %c" 2>/dev/null || die "no cluster answers (scripts/local_slurm.sh start)" ;;
    *) die "usage: scripts/local_slurm.sh start|stop|status" ;;
esac
