#!/usr/bin/env bash
# Throw-away single-machine SLURM cluster for trying the launcher and for CI /
# integration tests. NOT for production clusters: everything runs as root,
# the accounting database has no password, and all state is wiped on `up`.
#
# Usage (as root, Debian 12, systemd not needed):
#   bash slurm/local_cluster.sh up      # install packages if missing, start, wait until idle
#   bash slurm/local_cluster.sh down    # stop the daemons this script started
#   bash slurm/local_cluster.sh status  # exit 0 only when the cluster is up
#
# Cluster: partition `debug` (default) with two nodes n1 and n2 on this
# machine, each with all local CPUs and memory, so `srun -N2` works. Real
# accounting (slurmdbd + MariaDB) so `sacct` works. Requeued jobs rerun after
# ~12 s (short credential lifetime). Job ids restart at 1 on every `up`.
#
# /etc/slurm/slurm.conf and slurmdbd.conf are written by this script (clients
# read them there); it refuses to overwrite ones it did not write. Logs, pid
# files and the database live in $BFLY_SLURM_DIR (default /tmp/bfly-slurm).
# `up` on a running cluster is a no-op; `down && up` restarts it from scratch.
set -euo pipefail

STATE_DIR="${BFLY_SLURM_DIR:-/tmp/bfly-slurm}"
CLUSTER_NAME=bfly
CTLD_PORT=6817
DBD_PORT=6819
NODE_PORTS=(6821 6822)          # one slurmd per node: n1, n2
DB_PORT=6830                    # private MariaDB, 127.0.0.1 only
WAIT_S=30
CACHE_DIR=/var/cache/bfly-slurm  # pristine MariaDB data dir, reused by every `up`

CONF_DIR=/etc/slurm
MARKER="# Written by bfly slurm/local_cluster.sh"
PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
NODES=(n1 n2)
# Start order; `down` stops in reverse. slurmd@NODE is the slurmd of NODE.
ALL_DAEMONS=(munged mariadbd slurmdbd slurmctld "${NODES[@]/#/slurmd@}")
# Daemons and clients alike must read the config written here.
export SLURM_CONF=$CONF_DIR/slurm.conf

die() {
    echo "local_cluster: error: $*" >&2
    exit 1
}

log() { echo "local_cluster: $*"; }

show_log_tail() {
    local file=$1
    if [[ -f $file ]]; then
        echo "---- last lines of $file ----" >&2
        tail -n 25 "$file" >&2
    fi
}

# Poll a command until it succeeds; fail after WAIT_S or as soon as the
# tracked daemon `name` (if already tracked) has died.
wait_for() {
    local name=$1 logfile=$2
    shift 2
    local deadline=$((SECONDS + WAIT_S))
    until "$@" >/dev/null 2>&1; do
        if [[ -f $(pid_file_of "$name") ]] && ! tracked_alive "$name"; then
            show_log_tail "$logfile"
            die "$name exited during start-up"
        fi
        if ((SECONDS >= deadline)); then
            show_log_tail "$logfile"
            die "$name did not come up within ${WAIT_S}s (waiting for: $*)"
        fi
        sleep 0.2
    done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---- pid tracking: only daemons started here are ever stopped ----

pid_file_of() { echo "$STATE_DIR/pids/$1"; }

# Alive and still the program we started (guards against pid reuse).
tracked_alive() {
    local name=$1 file pid
    file=$(pid_file_of "$name")
    [[ -f $file ]] || return 1
    pid=$(<"$file")
    pid_running "$pid" || return 1
    [[ $(<"/proc/$pid/comm") == "$(program_of "$name")" ]]
}

# Zombies count as gone: an init that reaps slowly must not slow `down`.
pid_running() {
    local state
    state=$(sed -n 's/^.*) \(.\).*$/\1/p' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z ]]
}

program_of() { echo "${1%%@*}"; }   # "slurmd@n1" -> "slurmd"

# Daemons that fork write their own pid file; copy it into pids/.
track_from_pidfile() {
    local name=$1 pidfile=$2 logfile=$3
    wait_for "$name" "$logfile" test -s "$pidfile"
    cp "$pidfile" "$(pid_file_of "$name")"
}

stop_tracked() {
    local name=$1 file pid
    file=$(pid_file_of "$name")
    [[ -f $file ]] || return 0
    if tracked_alive "$name"; then
        pid=$(<"$file")
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do
            pid_running "$pid" || break
            sleep 0.1
        done
        if pid_running "$pid"; then
            log "$name (pid $pid) ignored SIGTERM for 10s, killing"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$file"
}

# ---- installation ----

packages_present() {
    local cmd
    for cmd in slurmctld slurmd slurmdbd sinfo sacct munged mariadbd mariadb-install-db; do
        command -v "$cmd" >/dev/null 2>&1 || return 1
    done
}

install_packages() {
    packages_present && return 0
    command -v apt-get >/dev/null || die "packages missing and apt-get not available"
    log "installing ${PACKAGES[*]}"
    # Keep package scripts from starting daemons with the default configs.
    local own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        own_policy=1
    fi
    local rc=0
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}"; } \
        >"/tmp/bfly-slurm-apt.log" 2>&1 || rc=$?
    ((own_policy)) && rm -f /usr/sbin/policy-rc.d
    if ((rc != 0)); then
        show_log_tail /tmp/bfly-slurm-apt.log
        die "apt-get install failed (rc=$rc)"
    fi
    packages_present || die "packages installed but commands still missing"
}

# ---- configuration ----

check_conf_ours() {
    local file=$1
    if [[ -e $file ]] && ! grep -qxF "$MARKER" "$file"; then
        die "$file exists and was not written by this script; move it away first"
    fi
}

write_slurm_conf() {
    # Hardware line as slurmd detects it, so slurmd accepts the node definition.
    local hw
    hw=$(slurmd -C | head -n 1 | sed 's/^NodeName=[^ ]* //')
    local i nodes_conf=""
    for i in "${!NODES[@]}"; do
        nodes_conf+="NodeName=${NODES[$i]} NodeHostname=localhost NodeAddr=127.0.0.1 Port=${NODE_PORTS[$i]} $hw"$'\n'
    done
    cat >"$CONF_DIR/slurm.conf" <<EOF
$MARKER
# Local test cluster; state in $STATE_DIR.
ClusterName=$CLUSTER_NAME
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
AuthType=auth/munge
# Requeued jobs are held for cred_expire+1 s; the default is 120 s.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/slurmd-%n
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
# No cgroups in containers/VMs without systemd.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Scan often so a requeued job starts as soon as its hold ends.
SchedulerParameters=sched_interval=2,bf_interval=1
JobRequeue=1
ReturnToService=2
MpiDefault=none
KillWait=5
MinJobAge=300
$nodes_conf
PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP
EOF
}

write_slurmdbd_conf() {
    cat >"$CONF_DIR/slurmdbd.conf" <<EOF
$MARKER
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$STATE_DIR/run/slurmdbd.pid
LogFile=$STATE_DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=root
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$CONF_DIR/slurmdbd.conf"   # slurmdbd refuses a world-readable file
}

# ---- daemons ----

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_works; then
        log "munged already running (not ours), using it"
        return 0
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    rm -f /run/munge/munged.pid
    # munged refuses to run as root; it forks and writes its pid file.
    runuser -u munge -- munged 9>&-
    track_from_pidfile munged /run/munge/munged.pid /var/log/munge/munged.log
    wait_for munged /var/log/munge/munged.log munge_works
}

db_ping() { mariadb-admin --no-defaults -h 127.0.0.1 -P "$DB_PORT" -u root ping; }

# Throw-away database: small redo log, no durability (faster start).
DB_OPTS=(--innodb-log-file-size=8M --innodb-buffer-pool-size=64M
    --innodb-doublewrite=0 --innodb-flush-log-at-trx-commit=0 --skip-log-bin)

# mariadb-install-db takes 0.5-6 s depending on load; copying its output is
# much faster, so it runs once per MariaDB version. Prints the template path.
db_template() {
    local version template tmp
    version=$(mariadbd --version | awk '{print $3}')
    template=$CACHE_DIR/mariadb-$version
    if [[ ! -d $template ]]; then
        mkdir -p "$CACHE_DIR"
        tmp=$(mktemp -d "$CACHE_DIR/tmp.XXXXXX")
        chown mysql:mysql "$tmp"
        mariadb-install-db --no-defaults --user=mysql --datadir="$tmp" \
            --auth-root-authentication-method=normal --skip-test-db "${DB_OPTS[@]}" \
            >"$STATE_DIR/log/mariadb-install.log" 2>&1 \
            || { show_log_tail "$STATE_DIR/log/mariadb-install.log"; rm -rf "$tmp"; die "mariadb-install-db failed"; }
        mv "$tmp" "$template"
    fi
    echo "$template"
}

start_mariadb() {
    local db=$STATE_DIR/mysql template
    template=$(db_template)
    cp -a "$template" "$db"
    # setsid + redirects: it must not hold the caller's terminal or pipes.
    setsid mariadbd --no-defaults --user=mysql --datadir="$db" \
        --socket="$db/mysqld.sock" --bind-address=127.0.0.1 --port="$DB_PORT" \
        --pid-file="$db/mariadbd.pid" "${DB_OPTS[@]}" \
        </dev/null >>"$STATE_DIR/log/mariadb.log" 2>&1 9>&- &
    echo $! >"$(pid_file_of mariadbd)"
    wait_for mariadbd "$STATE_DIR/log/mariadb.log" db_ping
    # Its own pid file is authoritative should setsid have forked.
    cp "$db/mariadbd.pid" "$(pid_file_of mariadbd)"
}

cluster_registered() {
    sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER_NAME"
}

register_cluster() {
    cluster_registered || { sacctmgr -i add cluster "$CLUSTER_NAME" && cluster_registered; }
}

start_slurmdbd() {
    slurmdbd 9>&-
    track_from_pidfile slurmdbd "$STATE_DIR/run/slurmdbd.pid" "$STATE_DIR/log/slurmdbd.log"
    wait_for slurmdbd "$STATE_DIR/log/slurmdbd.log" port_open "$DBD_PORT"
    # Register the cluster before slurmctld starts so its first jobs are recorded.
    wait_for slurmdbd "$STATE_DIR/log/slurmdbd.log" register_cluster
}

start_slurmctld() {
    slurmctld 9>&-
    track_from_pidfile slurmctld "$STATE_DIR/run/slurmctld.pid" "$STATE_DIR/log/slurmctld.log"
    wait_for slurmctld "$STATE_DIR/log/slurmctld.log" scontrol ping
}

nodes_idle() {
    [[ $(sinfo -h -N -p debug -o '%t' | grep -cx idle) -eq ${#NODES[@]} ]]
}

start_slurmds() {
    local node
    for node in "${NODES[@]}"; do
        slurmd -N "$node" 9>&-
        track_from_pidfile "slurmd@$node" "$STATE_DIR/run/slurmd-$node.pid" "$STATE_DIR/log/slurmd-$node.log"
    done
    wait_for slurmctld "$STATE_DIR/log/slurmctld.log" nodes_idle
}

# ---- commands ----

all_up() {
    local name
    for name in "${ALL_DAEMONS[@]}"; do
        [[ $name == munged ]] && continue   # may legitimately be someone else's
        tracked_alive "$name" || return 1
    done
    munge_works && nodes_idle_or_busy
}

nodes_idle_or_busy() {
    # Up means every node responds; running jobs are fine.
    local bad
    bad=$(sinfo -h -N -p debug -o '%t' 2>/dev/null | grep -cvE '^(idle|mix|alloc|comp)$' || true)
    [[ -n $(sinfo -h -N -p debug -o '%N' 2>/dev/null) && $bad -eq 0 ]]
}

any_tracked() {
    compgen -G "$STATE_DIR/pids/*" >/dev/null
}

# Refuse to wipe a directory we did not create (STATE_DIR may be overridden).
prepare_state_dir() {
    [[ -n $STATE_DIR && $STATE_DIR != / ]] || die "bad state dir '$STATE_DIR'"
    if [[ -d $STATE_DIR && -n $(ls -A "$STATE_DIR") && ! -f $STATE_DIR/.bfly-slurm ]]; then
        die "$STATE_DIR is not empty and not a bfly-slurm state dir"
    fi
    rm -rf "$STATE_DIR"
    mkdir -p "$STATE_DIR"/{pids,run,log,ctld}
    touch "$STATE_DIR/.bfly-slurm"
}

cmd_up() {
    if all_up; then
        log "already up"
        cmd_status
        return 0
    fi
    any_tracked && { log "partially up, restarting"; cmd_down; }
    local start_ns
    start_ns=$(date +%s%N)
    trap stop_after_failed_up EXIT
    install_packages
    check_conf_ours "$CONF_DIR/slurm.conf"
    check_conf_ours "$CONF_DIR/slurmdbd.conf"
    prepare_state_dir
    mkdir -p "$CONF_DIR"
    write_slurm_conf
    write_slurmdbd_conf
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurmctld
    start_slurmds
    trap - EXIT
    log "up in $(( ($(date +%s%N) - start_ns) / 1000000 )) ms"
    cmd_status
}

# A failed `up` must not leave half a cluster running.
stop_after_failed_up() {
    local rc=$?
    ((rc != 0)) || return 0
    echo "local_cluster: up failed, stopping the daemons it started" >&2
    stop_all_tracked
    exit "$rc"
}

stop_all_tracked() {
    local i
    for ((i = ${#ALL_DAEMONS[@]} - 1; i >= 0; i--)); do
        stop_tracked "${ALL_DAEMONS[$i]}"
    done
}

cancel_all_jobs() {
    tracked_alive slurmctld || return 0
    scancel --full --quiet --partition=debug 2>/dev/null || true
    # Let slurmstepd processes finish before their slurmd goes away.
    local deadline=$((SECONDS + 15))
    while [[ -n $(squeue -h -o %i 2>/dev/null) ]] && ((SECONDS < deadline)); do
        sleep 0.2
    done
}

cmd_down() {
    if ! any_tracked; then
        log "not running (nothing tracked in $STATE_DIR/pids)"
        return 0
    fi
    cancel_all_jobs
    stop_all_tracked
    log "down"
}

cmd_status() {
    local name state rc=0
    for name in "${ALL_DAEMONS[@]}"; do
        if tracked_alive "$name"; then
            state="running (pid $(<"$(pid_file_of "$name")"))"
        elif [[ $name == munged ]] && munge_works; then
            state="running (not started by this script)"
        else
            state="stopped"
            rc=1
        fi
        printf '  %-11s %s\n' "$name" "$state"
    done
    if ((rc == 0)) && ! sinfo -h -N -p debug -o '  node %N: partition=%P state=%t cpus=%c mem_mb=%m'; then
        echo "  controller not responding"
        rc=1
    fi
    return $rc
}

main() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (starts system daemons)"
    # Serialize concurrent calls (CI and a user, parallel test workers).
    # Daemons are started with `9>&-` so they do not inherit (and hold) the lock.
    exec 9>"${STATE_DIR%/}.lock"
    flock -w 300 9 || die "another local_cluster.sh is still running (lock ${STATE_DIR%/}.lock)"
    case "${1:-}" in
        up) cmd_up ;;
        down) cmd_down ;;
        status) cmd_status ;;
        *) die "usage: $0 up|down|status  (state dir: \$BFLY_SLURM_DIR, default /tmp/bfly-slurm)" ;;
    esac
}

main "$@"
