package agent

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Caller is the process at the other end of a local-socket connection, as the kernel and the
// host's cgroup tree describe it (never as the caller describes itself).
type Caller struct {
	// PID is the caller's PID in the agent's PID namespace (the host's: the agent is hostPID), taken
	// by the kernel when the caller connected (SO_PEERCRED).
	PID int
	// UID is the caller's user ID (logged only: launchers run as the app's user).
	UID uint32
	// PidNS is the inode of the caller's PID namespace, read while the caller was known alive.
	PidNS uint64
	// PodUID and ContainerID come from the caller's cgroup path (the kubelet's layout).
	PodUID      string
	ContainerID string
	// Err says why the caller is not a container of a pod; such a caller is refused.
	Err error
}

// identifyPeer returns who is connected on c: SO_PEERCRED → /proc/<pid>/cgroup → pod UID and
// container ID. The caller's process is pinned by a pidfd (SO_PEERPIDFD, else pidfd_open right
// away) and checked alive after /proc was read, so a PID reused by another process between the
// connect and the read cannot lend the caller another pod's identity.
func identifyPeer(c net.Conn, procRoot string) Caller {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return Caller{Err: fmt.Errorf("not a unix socket connection (%T)", c)}
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return Caller{Err: fmt.Errorf("connection fd: %w", err)}
	}
	var (
		cred     *unix.Ucred
		pidfd    = -1
		credErr  error
		pidfdErr error
	)
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		pidfd, pidfdErr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PEERPIDFD)
	}); err != nil {
		return Caller{Err: fmt.Errorf("connection fd: %w", err)}
	}
	if credErr != nil {
		return Caller{Err: fmt.Errorf("SO_PEERCRED: %w", credErr)}
	}
	caller := Caller{PID: int(cred.Pid), UID: cred.Uid}
	if caller.PID <= 0 {
		// The peer is in a PID namespace the agent cannot see (the agent is not hostPID?).
		caller.Err = fmt.Errorf("SO_PEERCRED: the caller's PID is not visible from the agent's PID namespace")
		return caller
	}
	if pidfdErr != nil {
		// Kernels before 6.5 have no SO_PEERPIDFD: pin the PID now, a smaller window.
		if pidfd, err = unix.PidfdOpen(caller.PID, 0); err != nil {
			caller.Err = fmt.Errorf("pidfd_open %d: %w", caller.PID, err)
			return caller
		}
	}
	defer unix.Close(pidfd)
	caller.Err = readCaller(&caller, procRoot)
	if caller.Err == nil {
		if err := unix.PidfdSendSignal(pidfd, 0, nil, 0); err != nil {
			caller.Err = fmt.Errorf("the caller (PID %d) exited before it was identified", caller.PID)
		}
	}
	return caller
}

// readCaller fills the pod UID, container ID and PID namespace of caller.PID from /proc.
func readCaller(caller *Caller, procRoot string) error {
	dir := procRoot + "/" + strconv.Itoa(caller.PID)
	b, err := os.ReadFile(dir + "/cgroup")
	if err != nil {
		return fmt.Errorf("caller PID %d: %w", caller.PID, err)
	}
	caller.PodUID, caller.ContainerID, err = ParsePodCgroup(string(b))
	if err != nil {
		return fmt.Errorf("caller PID %d: %w", caller.PID, err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(dir+"/ns/pid", &st); err != nil {
		return fmt.Errorf("caller PID %d: PID namespace: %w", caller.PID, err)
	}
	caller.PidNS = st.Ino
	return nil
}

// ParsePodCgroup reads the content of /proc/<pid>/cgroup and returns the pod UID and container ID
// of a process in a Kubernetes container, for the kubelet's cgroupfs and systemd drivers, cgroup
// v1 (one line per hierarchy) and v2 (one "0::" line), under any cgroup root (kubelet
// --cgroup-root, nested nodes) and seen from another cgroup namespace ("/../.." prefixes):
//
//	cgroupfs: …/kubepods[/burstable|/besteffort]/pod<uid>/<container id>
//	systemd:  …/kubepods[-qos].slice/kubepods[-qos]-pod<uid_with_underscores>.slice/<runtime>-<container id>.scope
//
// Strict: the pod element must be followed by exactly one container element (a 64-hex ID), and
// every hierarchy that names a pod must name the same pod and container; lines naming no pod are
// ignored (v1 hierarchies a runtime does not manage, the hybrid v2 line).
func ParsePodCgroup(content string) (podUID, containerID string, err error) {
	for i, line := range strings.Split(strings.TrimSpace(content), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 || !strings.HasPrefix(parts[2], "/") {
			return "", "", fmt.Errorf("cgroup line %d %q: not <id>:<controllers>:<path>", i+1, line)
		}
		uid, ctr, found, err := podInPath(parts[2])
		if err != nil {
			return "", "", fmt.Errorf("cgroup %s path %q: %w", hierarchyName(parts), parts[2], err)
		}
		if !found {
			continue
		}
		if podUID != "" && (uid != podUID || ctr != containerID) {
			return "", "", fmt.Errorf("cgroup hierarchies disagree: pod %s container %s in one, pod %s container %s in %s",
				podUID, containerID, uid, ctr, hierarchyName(parts))
		}
		podUID, containerID = uid, ctr
	}
	if podUID == "" {
		return "", "", errors.New("not in a Kubernetes pod's cgroup (no kubepods pod<uid> element)")
	}
	return podUID, containerID, nil
}

func hierarchyName(parts []string) string {
	if parts[1] == "" {
		return "v2"
	}
	return parts[1]
}

// podInPath finds the pod element of one cgroup path and the container element after it.
func podInPath(path string) (uid, ctr string, found bool, err error) {
	elems := strings.Split(strings.Trim(path, "/"), "/")
	at := -1
	for i, e := range elems {
		u, ok := podElement(e)
		if !ok {
			continue
		}
		if at >= 0 {
			return "", "", false, errors.New("more than one pod element")
		}
		at, uid = i, u
	}
	if at < 0 {
		return "", "", false, nil
	}
	if at == len(elems)-1 {
		return "", "", false, fmt.Errorf("pod %s: the process is in the pod's cgroup, not in a container's", uid)
	}
	if at != len(elems)-2 {
		return "", "", false, fmt.Errorf("pod %s: %d elements after the pod element, want one (the container)", uid, len(elems)-1-at)
	}
	ctr, ok := containerElement(elems[at+1])
	if !ok {
		return "", "", false, fmt.Errorf("pod %s: %q is not a container ID element", uid, elems[at+1])
	}
	return uid, ctr, true, nil
}

// podElement recognizes "pod<uid>" (cgroupfs) and "kubepods[-<qos>]-pod<uid_>.slice" (systemd).
func podElement(e string) (string, bool) {
	if s, ok := strings.CutPrefix(e, "pod"); ok {
		return s, isUUID(s)
	}
	s, ok := strings.CutSuffix(e, ".slice")
	if !ok || !strings.HasPrefix(s, "kubepods-") {
		return "", false
	}
	i := strings.LastIndex(s, "-pod")
	if i < 0 {
		return "", false
	}
	switch s[:i] {
	case "kubepods", "kubepods-burstable", "kubepods-besteffort":
	default:
		return "", false
	}
	u := strings.ReplaceAll(s[i+len("-pod"):], "_", "-")
	return u, isUUID(u) && !strings.Contains(s[i+len("-pod"):], "-")
}

// containerElement recognizes "<id>" (cgroupfs) and "<runtime>-<id>[.scope]" (systemd, CRI-O's
// cgroupfs "crio-<id>"): a 64-hex container ID.
func containerElement(e string) (string, bool) {
	s := strings.TrimSuffix(e, ".scope")
	if i := strings.LastIndexByte(s, '-'); i >= 0 {
		s = s[i+1:]
	}
	return s, isHex(s, 64)
}

// isUUID is the lowercase 8-4-4-4-12 form the API server gives pod UIDs.
func isUUID(s string) bool {
	p := strings.Split(s, "-")
	if len(p) != 5 {
		return false
	}
	for i, n := range []int{8, 4, 4, 4, 12} {
		if !isHex(p[i], n) {
			return false
		}
	}
	return true
}

func isHex(s string, n int) bool {
	if len(s) != n {
		return false
	}
	for _, c := range s {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}
