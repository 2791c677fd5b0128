"""Readings from /proc: CPU time and memory of a process, and of the whole machine.

Used by the load generator (CPU snapshots around each measured window) and by the
harness (idle RSS, peak RSS, load average).  Linux only; every reader returns None
when the file or the process is gone instead of raising.
"""

import os

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_times(pid):
    """(stat seconds, sched seconds or None) of a process: utime+stime, and the
    sum of se.sum_exec_runtime over its threads.  None if the process is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    stat_s = (int(fields[11]) + int(fields[12])) / float(CLK_TCK)
    sched_s = 0.0
    try:
        for tid in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/sched" % (pid, tid)) as f:
                for line in f:
                    if line.startswith("se.sum_exec_runtime"):
                        sched_s += float(line.split(":")[1]) / 1000.0
                        break
                else:
                    raise OSError("no se.sum_exec_runtime")
    except (OSError, ValueError, IndexError):
        sched_s = None
    return stat_s, sched_s


def proc_status_kb(pid, key):
    """A 'kB' line of /proc/PID/status (VmRSS, VmHWM), or None."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def system_busy():
    """(busy seconds, steal seconds) of the whole machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    busy = sum(values[:3]) + sum(values[5:8])
    return busy / float(CLK_TCK), values[7] / float(CLK_TCK) if len(values) > 7 else 0.0


def cpu_snapshot(pids):
    snap = {name: cpu_times(pid) for name, pid in pids.items()}
    snap["_system"] = system_busy()
    return snap


def cpu_delta(before, after):
    """CPU seconds each process used between two snapshots; "_background": what the rest of
    the machine (other processes, the kernel's own threads, steal) used meanwhile."""
    out = {}
    for name, b in before.items():
        a = after.get(name)
        if name == "_system":
            if a is not None and b is not None:
                ours = sum(v["s"] for v in out.values())
                out["_background"] = {"busy_s": round(a[0] - b[0], 3), "steal_s": round(a[1] - b[1], 3),
                                      "other_s": round(max(0.0, a[0] - b[0] - ours), 3)}
            continue
        if a is None or b is None:
            continue
        stat_s = a[0] - b[0]
        sched_s = a[1] - b[1] if a[1] is not None and b[1] is not None else None
        out[name] = {"stat_s": round(stat_s, 4), "sched_s": None if sched_s is None else round(sched_s, 6),
                     "s": round(sched_s if sched_s is not None else stat_s, 6),
                     "source": "sched" if sched_s is not None else "stat"}
    return out


def load_average():
    """The 1, 5 and 15 minute load averages of the machine (/proc/loadavg), or None."""
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except (OSError, ValueError):
        return None
