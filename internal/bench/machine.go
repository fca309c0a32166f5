package bench

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/loomnet/loom/internal/netns"
)

// clockTicks is USER_HZ, the unit of the CPU times in /proc/PID/stat: 100 on
// every Linux architecture Go supports (the kernel fixes it for user space
// whatever its internal HZ).
const clockTicks = 100

// cpuTimes is the first line of /proc/stat, reduced to what an idle share
// needs: idle (idle + iowait) and total jiffies.
type cpuTimes struct{ idle, total uint64 }

// parseCPUTimes reads the aggregate "cpu" line of /proc/stat: user nice
// system idle iowait irq softirq steal [guest guest_nice]. guest time is
// already counted in user, so only the first eight fields are summed.
func parseCPUTimes(data []byte) (cpuTimes, error) {
	line, _, _ := bytes.Cut(data, []byte("\n"))
	f := strings.Fields(string(line))
	if len(f) < 5 || f[0] != "cpu" {
		return cpuTimes{}, fmt.Errorf("/proc/stat: first line %q is not the aggregate cpu line", line)
	}
	var t cpuTimes
	for i, s := range f[1:min(len(f), 9)] {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return cpuTimes{}, fmt.Errorf("/proc/stat: cpu field %d %q: %w", i+1, s, err)
		}
		t.total += v
		if i == 3 || i == 4 { // idle, iowait
			t.idle += v
		}
	}
	return t, nil
}

func readCPUTimes() (cpuTimes, error) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return cpuTimes{}, fmt.Errorf("read CPU times: %w", err)
	}
	return parseCPUTimes(data)
}

// idleBetween is the share of CPU time spent idle between two readings.
func idleBetween(a, b cpuTimes) float64 {
	if b.total <= a.total {
		return 1
	}
	return float64(b.idle-a.idle) / float64(b.total-a.total)
}

// idleShare measures the machine's idle CPU share over d.
func idleShare(ctx context.Context, d time.Duration) (float64, error) {
	a, err := readCPUTimes()
	if err != nil {
		return 0, err
	}
	select {
	case <-ctx.Done():
		return 0, ctx.Err()
	case <-time.After(d):
	}
	b, err := readCPUTimes()
	if err != nil {
		return 0, err
	}
	return idleBetween(a, b), nil
}

// machineInfo describes this machine; the idle share is filled in by the
// caller.
func machineInfo() Machine {
	m := Machine{Cores: runtime.NumCPU(), GoVersion: runtime.Version()}
	if data, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(data))
	}
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		s := bufio.NewScanner(bytes.NewReader(data))
		for s.Scan() {
			if k, v, ok := strings.Cut(s.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if data, err := os.ReadFile("/proc/meminfo"); err == nil {
		if kib, ok := statusKiB(data, "MemTotal"); ok {
			m.MemoryMiB = kib / 1024
		}
	}
	if out, err := exec.Command("iperf3", "--version").Output(); err == nil {
		if f := strings.Fields(string(out)); len(f) >= 2 {
			m.Iperf3 = f[1]
		}
	}
	return m
}

// procSample is what the bench reads of a process: resident memory now and
// at its peak, and CPU time used so far.
type procSample struct {
	rssKiB, hwmKiB int64
	cpu            time.Duration // user + system
}

func readProc(pid int) (procSample, error) {
	dir := "/proc/" + strconv.Itoa(pid)
	status, err := os.ReadFile(dir + "/status")
	if err != nil {
		return procSample{}, fmt.Errorf("read memory of process %d: %w", pid, err)
	}
	stat, err := os.ReadFile(dir + "/stat")
	if err != nil {
		return procSample{}, fmt.Errorf("read CPU time of process %d: %w", pid, err)
	}
	var p procSample
	var ok bool
	if p.rssKiB, ok = statusKiB(status, "VmRSS"); !ok {
		return procSample{}, fmt.Errorf("process %d: no VmRSS in its status (a zombie?)", pid)
	}
	p.hwmKiB, _ = statusKiB(status, "VmHWM")
	ticks, err := parseStatCPU(stat)
	if err != nil {
		return procSample{}, fmt.Errorf("process %d: %w", pid, err)
	}
	p.cpu = time.Duration(ticks) * time.Second / clockTicks
	return p, nil
}

// statusKiB finds "Key:   1234 kB" in a /proc status-style file.
func statusKiB(data []byte, key string) (int64, bool) {
	s := bufio.NewScanner(bytes.NewReader(data))
	for s.Scan() {
		k, v, ok := strings.Cut(s.Text(), ":")
		if !ok || k != key {
			continue
		}
		f := strings.Fields(v)
		if len(f) == 0 {
			return 0, false
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		return n, err == nil
	}
	return 0, false
}

// parseStatCPU returns utime + stime, in clock ticks, from /proc/PID/stat.
// The command name in parentheses may hold spaces and parentheses, so the
// fields are counted from the last ')': state is field 3, utime 14, stime
// 15.
func parseStatCPU(data []byte) (uint64, error) {
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return 0, errors.New("stat has no command name")
	}
	f := strings.Fields(string(data[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("stat has %d fields after the command name, want at least 13", len(f))
	}
	var sum uint64
	for _, s := range f[11:13] {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("stat CPU time %q: %w", s, err)
		}
		sum += v
	}
	return sum, nil
}

// agentPID finds the loom agent running in the named namespace, through
// /proc: the process whose network namespace is it and whose command line
// is `loom agent ...` (after `ip netns exec` has exec'd it).
func agentPID(ns string) (int, error) {
	want, err := netns.Inode(netns.Path(ns))
	if err != nil {
		return 0, fmt.Errorf("find the agent in %s: %w", ns, err)
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0, fmt.Errorf("find the agent in %s: %w", ns, err)
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if ino, err := netns.Inode("/proc/" + e.Name() + "/ns/net"); err != nil || ino != want {
			continue
		}
		data, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(data), "\x00"), "\x00")
		if len(args) >= 2 && filepath.Base(args[0]) == "loom" && args[1] == "agent" {
			return pid, nil
		}
	}
	return 0, fmt.Errorf("no loom agent runs in namespace %s", ns)
}
