package agent

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/stasis-k8s/stasis/checkpoint"
	"github.com/stasis-k8s/stasis/criurun"
)

// Helpers over /proc. The agent runs with hostPID, so every PID here is a host PID unless named
// otherwise.

// appRoot returns the root of the tree to dump: the app, the launcher's child. Orphans of the
// app that the launcher reaped into its own children are not the app; the app is the one started
// first.
func appRoot(launcher int) (int, error) {
	var app int
	var first uint64
	for _, c := range criurun.Children(launcher) {
		st, err := criurun.StartTime(c)
		if err != nil {
			continue // exited meanwhile
		}
		if app == 0 || st < first {
			app, first = c, st
		}
	}
	if app == 0 {
		return 0, fmt.Errorf("process %d has no child: is the container started by `stasis launcher`, and is its app running?", launcher)
	}
	return app, nil
}

// nsPids returns the NSpid line of a process: its PID in each namespace from ours down to its own.
func nsPids(pid int) ([]int, error) {
	v, err := statusField(strconv.Itoa(pid), "NSpid")
	if err != nil {
		return nil, err
	}
	var out []int
	for _, f := range strings.Fields(v) {
		n, err := strconv.Atoi(f)
		if err != nil {
			return nil, err
		}
		out = append(out, n)
	}
	return out, nil
}

// procStatus is /proc/<pid>/status as fields (pid "self": the agent's own).
func procStatus(pid string) (map[string]string, error) {
	b, err := os.ReadFile("/proc/" + pid + "/status")
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok {
			out[k] = strings.TrimSpace(v)
		}
	}
	return out, nil
}

// statusField is the value of field key in /proc/<pid>/status.
func statusField(pid, key string) (string, error) {
	st, err := procStatus(pid)
	if err != nil {
		return "", err
	}
	if v := st[key]; v != "" {
		return v, nil
	}
	return "", fmt.Errorf("/proc/%s/status: no %s", pid, key)
}

// capSet parses a capability set of /proc/<pid>/status (hexadecimal).
func capSet(v string) (uint64, error) { return strconv.ParseUint(v, 16, 64) }

// pidIn returns pid's PID as seen in the PID namespace of ref (ref must be an ancestor namespace).
func pidIn(pid, ref int) (int, error) {
	r, err := nsPids(ref)
	if err != nil {
		return 0, err
	}
	p, err := nsPids(pid)
	if err != nil {
		return 0, err
	}
	lvl := len(r) - 1
	if lvl >= len(p) {
		return 0, fmt.Errorf("process %d is not below the PID namespace of %d", pid, ref)
	}
	return p[lvl], nil
}

// frozenTree is an app tree left stopped by a dump.
type frozenTree struct {
	pid   int
	start uint64
}

func newFrozenTree(pid int) frozenTree {
	st, _ := criurun.StartTime(pid)
	return frozenTree{pid: pid, start: st}
}

// thaw resumes the tree if it is still the same process.
func (t frozenTree) thaw() (bool, error) {
	st, err := criurun.StartTime(t.pid)
	if err != nil || st != t.start {
		return false, nil // gone: the pod was deleted and the launcher killed it
	}
	return true, criurun.SignalTree(t.pid, syscall.SIGCONT)
}

// processInfo records what restore needs to know about the dumped (stopped) tree.
func processInfo(root, ref int, m *checkpoint.Manifest) error {
	m.RootPid, _ = pidIn(root, ref)
	for fd := 0; fd < 3; fd++ {
		t, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", root, fd))
		if err != nil {
			t = ""
		}
		m.Stdio = append(m.Stdio, t)
	}
	app := root
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", app)); err == nil {
		m.Process.Argv = splitNul(b)
	}
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", app)); err == nil {
		m.Process.Env = splitNul(b)
	}
	m.Process.Cwd, _ = os.Readlink(fmt.Sprintf("/proc/%d/cwd", app))
	for _, p := range criurun.Descendants(root) {
		cp, err := pidIn(p, ref)
		if err != nil {
			continue
		}
		fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p))
		for _, de := range fds {
			fd, err := strconv.Atoi(de.Name())
			if err != nil {
				continue
			}
			link := fmt.Sprintf("/proc/%d/fd/%d", p, fd)
			target, err := os.Readlink(link)
			if err != nil || !filepath.IsAbs(target) || strings.HasSuffix(target, " (deleted)") {
				continue
			}
			fi, err := os.Stat(link)
			if err != nil || !fi.Mode().IsRegular() {
				continue
			}
			flags, pos := fdInfo(p, fd)
			m.OpenFiles = append(m.OpenFiles, checkpoint.OpenFile{Pid: cp, FD: fd, Path: target, Size: fi.Size(), Flags: flags, Pos: pos})
		}
	}
	return nil
}

func fdInfo(pid, fd int) (flags int, pos int64) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%d", pid, fd))
	if err != nil {
		return 0, 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(l, ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		switch k {
		case "pos":
			pos, _ = strconv.ParseInt(v, 10, 64)
		case "flags":
			f, _ := strconv.ParseInt(v, 8, 64)
			flags = int(f)
		}
	}
	return flags, pos
}

func splitNul(b []byte) []string {
	b = bytes.TrimRight(b, "\x00")
	if len(b) == 0 {
		return nil
	}
	return strings.Split(string(b), "\x00")
}

// processUID returns the real uid and gid of a process (to give the checkpoint to the app's user).
func processUID(pid int) (uid, gid int, err error) {
	var st syscall.Stat_t
	if err := syscall.Stat(fmt.Sprintf("/proc/%d", pid), &st); err != nil {
		return 0, 0, err
	}
	return int(st.Uid), int(st.Gid), nil
}
