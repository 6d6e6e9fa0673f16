#!/usr/bin/env bash
# A throw-away one-node SLURM cluster on 127.0.0.1, for testing profiles/slurm for real.
#
#   .ci/slurm_cluster.sh start    install slurm-wlm + munge when missing, write the config, start the
#                                 daemons, wait until the node is idle
#   .ci/slurm_cluster.sh stop     stop the daemons by their PIDs (idempotent), remove the copies of
#                                 the config in /etc/slurm
#   .ci/slurm_cluster.sh status   exit 0 when all three daemons run and the controller answers
#
# Environment:
#   VC_SLURM_DIR         config, state, spool, logs, PID files and munge files all live here
#                        (default /tmp/vc-slurm); every directory above it must be traversable
#                        by the munge user (mode 755, not a 700 pytest tmp_path)
#   VC_SLURM_PARTITIONS  partition names, the first is the default (default "cpu gpu": the names
#                        used by profiles/slurm, so the profile runs unchanged); all hold the node
#   VC_SLURM_CPUS, VC_SLURM_MEM_MB  the node's declared size (default 16 CPUs, 65536 MB)
#   VC_SLURM_PORT        slurmctld port; slurmd uses the next one (default 6817)
#
# Why it looks like this: there is no systemd, so munged (as user munge), slurmctld and
# slurmd are started by hand. The executor plugin drops SLURM_CONF in the job step, so the config
# is also copied to /etc/slurm/; `stop` removes it again, because an /etc/slurm/slurm.conf naming a
# dead controller makes every `scontrol` wait for a timeout, and the plugin calls scontrol whenever
# Snakemake loads it. Accounting is off, so Snakemake must poll squeue; MinJobAge keeps finished
# jobs visible to squeue for 10 minutes. The node declares one fake GPU (gres `File=/dev/null`) so
# that `sbatch --gpus=1` (from `resources: gpu=1`) is schedulable, and, with
# SlurmdParameters=config_overrides, more CPUs and memory than the box has, so that the production
# requests of profiles/slurm (8 CPUs and 32 GB for train) are accepted. Nothing enforces them (no
# cgroups): keep the number of concurrent jobs small with `snakemake --jobs`.
#
# Exit status of `start`: 0 running; 3 SLURM cannot be installed or started here (not root, no
# apt-get, apt-get failed); 1 the daemons did not come up (see the logs under $VC_SLURM_DIR/log).
set -euo pipefail

DIR=${VC_SLURM_DIR:-/tmp/vc-slurm}
read -r -a PARTITIONS <<<"${VC_SLURM_PARTITIONS:-cpu gpu}"
NODE_CPUS=${VC_SLURM_CPUS:-16}
NODE_MEM_MB=${VC_SLURM_MEM_MB:-65536}
PORT=${VC_SLURM_PORT:-6817}
CONF=$DIR/etc/slurm.conf
MARKER="# written by virtual-contrast .ci/slurm_cluster.sh"
NODE=localhost

log() { echo "slurm_cluster: $*" >&2; }

pid_alive() { # pid_alive FILE: the PID in FILE names a running process
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_for() { # wait_for SECONDS COMMAND...: retry COMMAND every 0.5 s until it succeeds
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then return 1; fi
        sleep 0.5
    done
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null && command -v sbatch >/dev/null; then
        return 0
    fi
    if ! command -v apt-get >/dev/null; then
        log "slurm-wlm/munge are not installed and there is no apt-get to install them"
        exit 3
    fi
    local aptlog=${TMPDIR:-/tmp}/vc-slurm-apt.log
    log "installing slurm-wlm and munge with apt-get (log: $aptlog)"
    if ! { apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            slurm-wlm munge; } >"$aptlog" 2>&1; then
        log "apt-get failed:"
        tail -n 5 "$aptlog" >&2 || true
        exit 3
    fi
}

write_config() {
    mkdir -p "$DIR"/{etc,state,spool,log,run,munge}
    cat >"$CONF" <<EOF
$MARKER
# One-node test cluster; everything it writes is under $DIR.
ClusterName=vctest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB Gres=gpu:1 State=UNKNOWN
EOF
    local p default=YES
    for p in "${PARTITIONS[@]}"; do
        echo "PartitionName=$p Nodes=$NODE Default=$default MaxTime=INFINITE State=UP" >>"$CONF"
        default=NO
    done
    # A fake GPU: enough for the scheduler to grant --gpus=1 (and set CUDA_VISIBLE_DEVICES=0).
    printf '%s\nName=gpu File=/dev/null Count=1\n' "$MARKER" >"$DIR/etc/gres.conf"
}

check_global_config() {
    # Never overwrite a configuration this script did not write, nor one of a cluster still running
    # from another directory (they would share /etc/slurm and the ports).
    local f other
    for f in slurm.conf gres.conf; do
        [[ -e /etc/slurm/$f ]] || continue
        if ! grep -qF "$MARKER" "/etc/slurm/$f"; then
            log "/etc/slurm/$f exists and was not written by this script; refusing to replace it"
            exit 3
        fi
    done
    if [[ -e /etc/slurm/slurm.conf ]]; then
        other=$(sed -n 's/^SlurmctldPidFile=//p' /etc/slurm/slurm.conf)
        if [[ -n $other && $other != "$DIR/run/slurmctld.pid" ]] && pid_alive "$other"; then
            log "another test cluster is running (${other%/run/slurmctld.pid}); stop it first"
            exit 3
        fi
    fi
}

start_munge() {
    pid_alive "$DIR/munge/munged.pid" && return 0
    if [[ ! -s $DIR/munge/munge.key ]]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    fi
    chown -R munge:munge "$DIR/munge"
    chmod 0700 "$DIR/munge"
    chmod 0400 "$DIR/munge/munge.key"
    # munged refuses to run as root; --force accepts the world-writable (sticky) /tmp above it.
    runuser -u munge -- munged --force \
        --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed"
}

node_idle() {
    [[ $(SLURM_CONF=$CONF sinfo -h -n "$NODE" -o %T 2>/dev/null | sort -u) == idle ]]
}

cmd_start() {
    if [[ $(id -u) -ne 0 ]]; then
        log "the test cluster needs root (daemons, /etc/slurm/slurm.conf, package installation)"
        exit 3
    fi
    install_packages
    if cmd_status >/dev/null 2>&1; then
        log "already running ($CONF)"
        return 0
    fi
    check_global_config
    mkdir -p "$DIR"
    chmod 0755 "$DIR"
    write_config
    mkdir -p /etc/slurm
    cp "$CONF" "$DIR/etc/gres.conf" /etc/slurm/
    start_munge
    if ! wait_for 10 test -S "$DIR/munge/munge.socket"; then
        log "munged did not start:"
        tail -n 5 "$DIR/munge/munged.log" >&2 || true
        exit 1
    fi
    pid_alive "$DIR/run/slurmctld.pid" || slurmctld -f "$CONF"
    pid_alive "$DIR/run/slurmd.pid" || slurmd -f "$CONF" -N "$NODE"
    if ! wait_for 60 node_idle; then
        log "node $NODE did not become idle within 60 s:"
        SLURM_CONF=$CONF sinfo -N -l >&2 || true
        tail -n 5 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
        exit 1
    fi
    log "running: partitions ${PARTITIONS[*]} on node $NODE (idle), config $CONF (also in /etc/slurm)"
}

stop_pidfile() { # stop_pidfile NAME FILE: SIGTERM, wait up to 15 s, then SIGKILL
    local name=$1 file=$2 pid
    [[ -s $file ]] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        if ! wait_for 15 bash -c "! kill -0 $pid"; then
            log "$name ($pid) ignored SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            wait_for 5 bash -c "! kill -0 $pid" || {
                log "$name ($pid) survived SIGKILL"
                return 1
            }
        fi
    fi
    rm -f "$file"
}

cmd_stop() {
    local rc=0 f
    if pid_alive "$DIR/run/slurmctld.pid"; then
        # Jobs would otherwise be killed with their slurmd, leaving stray job steps behind.
        SLURM_CONF=$CONF timeout 10 scancel --quiet --nodelist="$NODE" 2>/dev/null || true
    fi
    stop_pidfile slurmd "$DIR/run/slurmd.pid" || rc=1
    stop_pidfile slurmctld "$DIR/run/slurmctld.pid" || rc=1
    stop_pidfile munged "$DIR/munge/munged.pid" || rc=1
    # Remove our copies in /etc/slurm when they belong to this directory's cluster, or to a test
    # cluster whose controller is gone (a killed test run: its copy would slow every scontrol).
    if [[ -e /etc/slurm/slurm.conf ]] && grep -qF "$MARKER" /etc/slurm/slurm.conf; then
        local pidfile
        pidfile=$(sed -n 's/^SlurmctldPidFile=//p' /etc/slurm/slurm.conf)
        if grep -qF "StateSaveLocation=$DIR/state" /etc/slurm/slurm.conf \
            || ! pid_alive "$pidfile"; then
            rm -f /etc/slurm/slurm.conf
        fi
    fi
    if [[ ! -e /etc/slurm/slurm.conf && -e /etc/slurm/gres.conf ]] \
        && grep -qF "$MARKER" /etc/slurm/gres.conf; then
        rm -f /etc/slurm/gres.conf
    fi
    ((rc == 0)) && log "stopped ($DIR)"
    return $rc
}

cmd_status() {
    local rc=0 name file
    for name in munged slurmctld slurmd; do
        case $name in
            munged) file=$DIR/munge/munged.pid ;;
            *) file=$DIR/run/$name.pid ;;
        esac
        if pid_alive "$file"; then
            echo "$name running (pid $(cat "$file"))"
        else
            echo "$name not running"
            rc=1
        fi
    done
    if ((rc == 0)); then
        SLURM_CONF=$CONF timeout 10 sinfo -N -o "%N %P %T %G" || rc=1
    fi
    return $rc
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac
