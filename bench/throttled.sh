#!/usr/bin/env bash
# Run a command on a slower machine of this kind, emulated: a CPU-quota cgroup gives the command
# FRACTION of every core (the bench inside records the matmul peak it then measures).
#
#   sudo bash bench/throttled.sh 0.75 .venv/bin/python bench/first_contact.py --make-test --demo ...
#
# Needs root and the cgroup cpu controller (v1 at /sys/fs/cgroup/cpu, or v2 with cpu.max). The quota is
# enforced every 10 ms, so a 2048^3 matmul (~0.1 s) sees the throttled rate, not an unthrottled burst.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: bash bench/throttled.sh FRACTION COMMAND [ARGS...]   (FRACTION of each core, e.g. 0.75)" >&2
    exit 2
fi
fraction=$1; shift
period=10000
quota=$(python3 -c "import os, sys; f = float(sys.argv[1]); assert 0 < f <= 1, 'FRACTION must be in (0, 1]'; \
print(int(f * $period * os.cpu_count()))" "$fraction" 2>/dev/null) || { echo "FRACTION=$fraction must be a number in (0, 1]" >&2; exit 2; }
name="circuitlab-throttled-$$"
if [ -d /sys/fs/cgroup/cpu ] && [ -w /sys/fs/cgroup/cpu ]; then  # cgroup v1
    dir=/sys/fs/cgroup/cpu/$name
    mkdir "$dir"
    echo $period > "$dir/cpu.cfs_period_us"
    echo "$quota" > "$dir/cpu.cfs_quota_us"
    tasks=tasks
elif [ -f /sys/fs/cgroup/cgroup.controllers ] && [ -w /sys/fs/cgroup ]; then  # cgroup v2
    dir=/sys/fs/cgroup/$name
    mkdir "$dir"
    echo "$quota $period" > "$dir/cpu.max"
    tasks=cgroup.procs
else
    echo "no writable cgroup cpu controller here (needs root); run the command unthrottled and scale by peak" >&2
    exit 2
fi
echo "throttled: $fraction of each of $(nproc) cores (quota $quota us per $period us) in $dir" >&2
echo $$ > "$dir/$tasks"
set +e
"$@"
rc=$?
echo $$ > "$(dirname "$dir")/$tasks"  # back to the parent group, so this one can be removed
rmdir "$dir" 2>/dev/null || true  # stays while a child lives on; empty cgroups are harmless
exit $rc
