#!/usr/bin/env bash
# A real one-node Slurm on this Debian machine, for the cluster test of vldd.
#
#   bash .ci/local-slurm.sh up [--gpus N] [--no-accounting]   install what is missing, start
#   bash .ci/local-slurm.sh check                              sbatch round trip (+ sacct)
#   bash .ci/local-slurm.sh status
#   bash .ci/local-slurm.sh down                               stop the daemons it started
#
# It runs munged, slurmctld and slurmd (node "localhost", partition "debug"), and by default
# mariadb + slurmdbd so that `sacct` works: the Slurm executor plugin asks sacct for job states.
# --gpus N advertises N fake GPUs (GRES backed by empty files, no CUDA), so that rules with
# `resources: gpu=1` are scheduled as they would be on a GPU node. No cgroups and no systemd:
# each daemon is started by hand and stopped by the PID in its pid file, never by name.
# Needs root and apt (Debian/Ubuntu). Memory limits are scheduled but not enforced.
set -euo pipefail

ACTION=${1:-up}
[ $# -gt 0 ] && shift
GPUS=0
ACCOUNTING=1
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) GPUS=$2; shift 2 ;;
    --no-accounting) ACCOUNTING=0; shift ;;
    *) echo "local-slurm: unknown argument '$1' (see the header of $0)" >&2; exit 2 ;;
  esac
done

say() { echo "local-slurm: $*" >&2; }
fail() { say "ERROR: $*"; exit 1; }

ETC=/etc/slurm
SPOOL=/var/spool/slurm-local
LOGS=/var/log/slurm-local
STATE=/run/slurm-local            # pid files and the fake GPU device files
DB_SECRET=vldd-local-only         # a loopback-only database, reached through its unix socket

# name pidfile process-name
# (munged and mariadbd write their pid files as their own users, into their own run folders)
DAEMONS=("munged /run/munge/vldd-munged.pid munged"
         "mariadbd /run/mysqld/vldd-mariadbd.pid mariadbd"
         "slurmdbd $STATE/slurmdbd.pid slurmdbd"
         "slurmctld $STATE/slurmctld.pid slurmctld"
         "slurmd $STATE/slurmd.pid slurmd")

pid_in() { [ -s "$1" ] && tr -cd '0-9' <"$1" || true; }
# live PID COMM: the process exists, is not a zombie, and is the daemon we think it is
live() {
  [ -n "$1" ] && [ -r "/proc/$1/status" ] || return 1
  local state; state=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null)
  [ -n "$state" ] && [ "$state" != Z ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]
}
is_up() { live "$(pid_in "$2")" "$3"; }
await() { # await SECONDS WHAT CMD...
  local secs=$1 what=$2; local limit=$(( SECONDS + secs )); shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$limit" ] || fail "no answer after $secs s: $what (logs in $LOGS)"
    sleep 0.3
  done
}
stop_daemon() { # stop_daemon NAME PIDFILE COMM
  local pid; pid=$(pid_in "$2")
  if live "$pid" "$3"; then
    kill "$pid" 2>/dev/null || true
    local limit=$(( SECONDS + 20 ))
    while live "$pid" "$3"; do
      if [ "$SECONDS" -ge "$limit" ]; then kill -KILL "$pid" 2>/dev/null || true; break; fi
      sleep 0.2
    done
    say "stopped $1 ($pid)"
  fi
  rm -f "$2"
}

down() {
  local i
  for (( i=${#DAEMONS[@]}-1; i>=0; i-- )); do
    # shellcheck disable=SC2086
    stop_daemon ${DAEMONS[$i]}
  done
}

status() {
  local d name pidfile comm
  for d in "${DAEMONS[@]}"; do
    read -r name pidfile comm <<<"$d"
    if is_up "$name" "$pidfile" "$comm"; then echo "$name: up ($(pid_in "$pidfile"))"
    else echo "$name: down"; fi
  done
  command -v sinfo >/dev/null && sinfo 2>&1 || true
}

check() {
  command -v sbatch >/dev/null || fail "no sbatch: run '$0 up' first"
  local id
  id=$(sbatch --parsable --wait -p debug -t 1 --mem 50 -o /dev/null --wrap true) \
    || fail "an sbatch round trip failed (logs in $LOGS)"
  say "sbatch job $id completed"
  if [ "$(scontrol show config | sed -n 's/^AccountingStorageType *= *//p')" = accounting_storage/slurmdbd ]; then
    await 30 "job $id in sacct" sh -c "sacct -n -X -j $id -o State | grep -q COMPLETED"
    say "sacct reports job $id COMPLETED"
  fi
}

install_packages() {
  local want=(munge slurm-client slurmctld slurmd) missing=() p
  [ "$ACCOUNTING" = 1 ] && want+=(slurmdbd mariadb-server)
  for p in "${want[@]}"; do
    dpkg-query -W -f '${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return
  command -v apt-get >/dev/null || fail "missing ${missing[*]} and no apt-get: install Slurm by hand"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$STATE/apt.log" 2>&1 \
    || { cat "$STATE/apt.log" >&2; fail "apt-get install failed"; }
}

# write FILE MODE: stdin to FILE if it differs; returns 0 when the file changed
write_if_changed() {
  local tmp; tmp=$(mktemp)
  cat >"$tmp"
  if [ -f "$1" ] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; return 1; fi
  install -m "$2" "$tmp" "$1"; rm -f "$tmp"; return 0
}

slurm_conf() {
  local hw mem
  # the node line as slurmd sees this machine (CPUs, sockets, cores, threads)
  hw=$(slurmd -C | sed -n 's/^NodeName=[^ ]* \(.*\) RealMemory=.*/\1/p')
  [ -n "$hw" ] || fail "slurmd -C printed no hardware line"
  mem=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
  cat <<EOF
# Written by vldd's .ci/local-slurm.sh: one node, no cgroups, root runs everything.
ClusterName=vlddlocal
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
ReturnToService=2
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
# finished jobs stay visible to squeue for 5 min (the plugin wants >= 3x its first poll)
MinJobAge=300
KillWait=5
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=30
JobCompType=jobcomp/none
EOF
  if [ "$ACCOUNTING" = 1 ]; then
    cat <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
EOF
  else
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobAcctGatherType=jobacct_gather/none"
  fi
  if [ "$GPUS" -gt 0 ]; then
    echo "GresTypes=gpu"
    echo "NodeName=localhost $hw RealMemory=$mem Gres=gpu:$GPUS State=UNKNOWN"
  else
    echo "NodeName=localhost $hw RealMemory=$mem State=UNKNOWN"
  fi
  echo "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP"
}

start_accounting() {
  if ! is_up ${DAEMONS[1]}; then
    install -d -o mysql -g mysql -m 755 /run/mysqld
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >"$LOGS/mariadb-install.log" 2>&1
    setsid /usr/sbin/mariadbd --user=mysql --skip-networking --pid-file=/run/mysqld/vldd-mariadbd.pid \
      >>"$LOGS/mariadb.log" 2>&1 </dev/null &
    await 60 "mariadb" mysqladmin ping
    say "mariadb up"
  fi
  mysql <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_SECRET';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_SECRET';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
  local changed=0
  write_if_changed "$ETC/slurmdbd.conf" 600 <<EOF && changed=1
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_SECRET
StorageLoc=slurm_acct_db
EOF
  [ "$changed" = 1 ] && stop_daemon ${DAEMONS[2]}
  if ! is_up ${DAEMONS[2]}; then
    slurmdbd
    await 60 "slurmdbd" sacctmgr -n show cluster
    say "slurmdbd up"
  fi
}

up() {
  [ "$(id -u)" = 0 ] || fail "run it as root (it installs packages and starts daemons)"
  install -d -m 755 "$STATE" "$LOGS" "$SPOOL/ctld" "$SPOOL/d" "$ETC"
  install_packages
  getent hosts "$(hostname)" >/dev/null || echo "127.0.1.1 $(hostname)" >>/etc/hosts

  # munge: the package made a key; the daemon runs as user munge
  [ -s /etc/munge/munge.key ] || mungekey --create --force
  chown -R munge:munge /etc/munge; chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 755 /run/munge
  install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
  # a munged that answers (ours or the system's) is good enough
  if ! is_up ${DAEMONS[0]} && ! (munge -n | unmunge) >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/vldd-munged.pid
    await 20 "munged" sh -c 'munge -n | unmunge'
    say "munged up"
  fi

  # slurm.conf first: sacctmgr finds slurmdbd through it
  local changed=0 i gres=""
  for (( i=0; i<GPUS; i++ )); do : >"$STATE/fakegpu$i"; done
  [ "$GPUS" -gt 0 ] && gres="NodeName=localhost Name=gpu File=$STATE/fakegpu[0-$((GPUS - 1))]"
  slurm_conf | write_if_changed "$ETC/slurm.conf" 644 && changed=1
  echo "$gres" | write_if_changed "$ETC/gres.conf" 644 && changed=1

  [ "$ACCOUNTING" = 1 ] && start_accounting
  if [ "$changed" = 1 ]; then
    stop_daemon ${DAEMONS[4]}; stop_daemon ${DAEMONS[3]}
  fi
  if ! is_up ${DAEMONS[3]}; then slurmctld; await 60 "slurmctld" scontrol ping; say "slurmctld up"; fi
  if ! is_up ${DAEMONS[4]}; then slurmd -N localhost; say "slurmd up"; fi
  # a node left DOWN/DRAIN by an earlier run answers to RESUME
  scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
  await 60 "node localhost idle" sh -c 'sinfo -h -N -n localhost -o %t | grep -Eq "^(idle|mix|alloc)"'
  say "up: $(sinfo -h -N -o '%N %t cpus=%c mem=%m gres=%G' | head -1)"
}

case "$ACTION" in
  up) up ;;
  down) down ;;
  status) status ;;
  check) check ;;
  *) fail "unknown action '$ACTION': up, check, status or down" ;;
esac
