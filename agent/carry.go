package agent

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/checkpoint"
	"github.com/stasis-k8s/stasis/criurun"
	"github.com/stasis-k8s/stasis/internal/confine"
)

// The container's filesystem state that travels with a checkpoint. CRIU reopens every file the
// tree holds by path at restore, so a file that a new container of the same image lacks fails
// the restore: the JVM's /tmp/hsperfdata_<user>/<pid>, a log file, a SQLite database, a POSIX
// shared memory segment in /dev/shm. The agent decides for each held file, by the mount it lives
// on, whether it follows the pod (an image file, a persistent volume) or must be carried (the
// writable layer, a tmpfs of the container, an emptyDir), and carries the latter while the tree
// is still stopped after its dump, so the copy is what CRIU saw.

// heldFile is a regular file the stopped tree holds.
type heldFile struct {
	path string   // as the tree sees it
	how  string   // "open" or "mapped"
	f    *os.File // the very file, opened through /proc: no path was looked up
	stx  unix.Statx_t
}

// heldFiles opens every regular file the processes hold open or mapped, once per file.
// Deleted files are CRIU's (it keeps their contents as ghost files).
func heldFiles(pids []int) []heldFile {
	var out []heldFile
	seen := map[[3]uint64]bool{}
	add := func(link, how string) {
		target, err := os.Readlink(link)
		if err != nil || !path.IsAbs(target) || strings.HasSuffix(target, " (deleted)") {
			return // sockets, pipes, anonymous files; gone meanwhile
		}
		// Stat before opening: opening a device or a FIFO as root could act on it.
		if fi, err := os.Stat(link); err != nil || !fi.Mode().IsRegular() {
			return
		}
		f, err := os.OpenFile(link, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_NOCTTY, 0)
		if err != nil {
			return
		}
		var stx unix.Statx_t
		if err := unix.Statx(int(f.Fd()), "", unix.AT_EMPTY_PATH, unix.STATX_BASIC_STATS|unix.STATX_MNT_ID, &stx); err != nil || stx.Mode&unix.S_IFMT != unix.S_IFREG {
			f.Close()
			return
		}
		key := [3]uint64{uint64(stx.Dev_major), uint64(stx.Dev_minor), stx.Ino}
		if seen[key] {
			f.Close()
			return
		}
		seen[key] = true
		out = append(out, heldFile{path: target, how: how, f: f, stx: stx})
	}
	for _, p := range pids {
		for _, sub := range []struct{ dir, how string }{{"fd", "open"}, {"map_files", "mapped"}} {
			dir := fmt.Sprintf("/proc/%d/%s", p, sub.dir)
			names, _ := readDirNames(dir)
			for _, n := range names {
				add(dir+"/"+n, sub.how)
			}
		}
	}
	return out
}

func readDirNames(dir string) ([]string, error) {
	d, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	return d.Readdirnames(-1)
}

// mountPoint is one line of a mountinfo: where a mount is, and what it is.
type mountPoint struct {
	point  string // in the process' mount namespace
	fstype string
	super  string // the superblock's options (an overlay's layers)
}

// readMountinfo maps mount IDs to their mount points, as /proc/<pid>/mountinfo lists them.
func readMountinfo(pid int) (map[uint64]mountPoint, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", pid))
	if err != nil {
		return nil, err
	}
	out := map[uint64]mountPoint{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		sep := -1
		for i, x := range f {
			if x == "-" {
				sep = i
				break
			}
		}
		if len(f) < 5 || sep < 0 || sep+1 >= len(f) {
			continue
		}
		id, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil {
			continue
		}
		mp := mountPoint{point: unescapeMount(f[4]), fstype: f[sep+1]}
		if sep+3 < len(f) {
			mp.super = f[sep+3]
		}
		out[id] = mp
	}
	return out, sc.Err()
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space, …).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// emptyDirPlugin is how the kubelet names emptyDir volumes in their host paths
// (/var/lib/kubelet/pods/<uid>/volumes/kubernetes.io~empty-dir/<name>).
const emptyDirPlugin = "/volumes/kubernetes.io~empty-dir/"

// carryReason decides whether a held file must travel with the checkpoint: "" when it follows the
// pod by itself, else why it is carried. mp is the mount it lives on, vols the container's volume
// mounts, changed whether the file changed since the container started.
func carryReason(how string, mp mountPoint, vols []Mount, changed bool) string {
	for _, v := range vols {
		if v.ContainerPath != mp.point {
			continue
		}
		if strings.Contains(v.HostPath, emptyDirPlugin) && !v.ReadOnly {
			return how + " in emptyDir volume " + mp.point // a new pod gets a new, empty one
		}
		return "" // a persistent volume follows the pod; configMaps and secrets are recreated
	}
	switch {
	case mp.point == "/" && changed:
		return how + " in the writable layer"
	case mp.point == "/":
		return "" // the image's own file: a new container of the same image has it
	case mp.fstype == "tmpfs":
		return how + " on tmpfs " + mp.point // the runtime's /dev/shm and the like: new per pod
	}
	return ""
}

// changedSince is the bound for "changed since the container started": the container's start
// (CRI) or, unknown, its PID 1's start. The kernel stamps files with a coarse clock (up to a tick
// behind) and gives its boot time in whole seconds (the computed start is then up to a second
// early): erring early carries an image file in vain, erring late would lose a file.
func changedSince(t Target) (time.Time, error) {
	const coarse = 10 * time.Millisecond
	if !t.Started.IsZero() {
		return t.Started.Add(-coarse), nil
	}
	ticks, err := criurun.StartTime(t.PID)
	if err != nil {
		return time.Time{}, err
	}
	boot, err := bootTime()
	if err != nil {
		return time.Time{}, err
	}
	const clkTck = 100 // USER_HZ, fixed by the kernel's ABI
	return boot.Add(time.Duration(ticks) * time.Second / clkTck).Add(-coarse), nil
}

// bootTime is btime of /proc/stat.
func bootTime() (time.Time, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return time.Time{}, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "btime "); ok {
			s, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err != nil {
				return time.Time{}, fmt.Errorf("/proc/stat btime %q: %w", v, err)
			}
			return time.Unix(s, 0), nil
		}
	}
	return time.Time{}, fmt.Errorf("/proc/stat: no btime")
}

// carryFiles carries the held files of the stopped tree that a new container would lack, except
// those under a checkpoint-files path (listed: the user's copy wins), and records the
// directories they and the tree's working directories need; with checkpoint-rootfs, the whole
// writable layer's changes too. A file that cannot be carried fails the dump: an eviction must
// not go ahead on a checkpoint that could only cold-start.
func (d *dump) carryFiles(m *checkpoint.Manifest, listed []string) error {
	pids := criurun.Descendants(d.app)
	mounts, err := readMountinfo(d.app)
	if err != nil {
		return fmt.Errorf("the tree's mounts: %w", err)
	}
	since, err := changedSince(d.t)
	if err != nil {
		return fmt.Errorf("the container's start: %w", err)
	}
	c := d.w.Carrier(d.a.cfg.CopyLimits)
	dirs := map[string]bool{}
	if err := d.carryHeld(c, pids, mounts, since, listed, dirs); err != nil {
		return err
	}
	for _, p := range pids {
		if cwd, err := os.Readlink(fmt.Sprintf("/proc/%d/cwd", p)); err == nil && cwd != "/" && path.IsAbs(cwd) {
			dirs[cwd] = true
		}
	}
	if d.c.Rootfs {
		if err := d.carryRootfs(c, since, listed, dirs); err != nil {
			return err
		}
		m.Deleted = d.deleted(mounts)
	}
	m.Carried, m.CarriedDirs = c.Files, d.dirMeta(dirs)
	return nil
}

// carryHeld carries the files the tree holds open or mapped that do not follow the pod.
func (d *dump) carryHeld(c *checkpoint.Carrier, pids []int, mounts map[uint64]mountPoint, since time.Time, listed []string, dirs map[string]bool) error {
	held := heldFiles(pids)
	defer func() {
		for _, h := range held {
			h.f.Close()
		}
	}()
	for _, h := range held {
		if under(h.path, listed) || checkpoint.ValidFilePath(h.path) != nil {
			continue
		}
		changed := !time.Unix(h.stx.Ctime.Sec, int64(h.stx.Ctime.Nsec)).Before(since)
		why := carryReason(h.how, mounts[h.stx.Mnt_id], d.t.Mounts, changed)
		if why == "" {
			continue
		}
		if err := c.Carry(h.f, h.path, why); err != nil {
			return fmt.Errorf("the checkpoint would not restore: %w (keep such files in a persistent volume)", err)
		}
		for p := path.Dir(h.path); p != "/"; p = path.Dir(p) {
			dirs[p] = true
		}
	}
	return nil
}

// deleted lists the image paths the container deleted, when its root is an overlay whose upper
// directory the agent reaches. The overlay's options name it in the mount namespace of the
// runtime that mounted it, which is the namespace of the container's parent (the runtime's shim):
// the agent, in the host's PID namespace, opens it through that process' root. Elsewhere
// deletions are not tracked, and the log says so.
func (d *dump) deleted(mounts map[uint64]mountPoint) []string {
	var root mountPoint
	for _, mp := range mounts {
		if mp.point == "/" {
			root = mp
		}
	}
	upper := overlayUpper(root.super)
	if root.fstype != "overlay" || !path.IsAbs(upper) {
		d.log.Info().Str("fstype", root.fstype).Msg("checkpoint-rootfs: the root is not an overlay; deleted paths are not carried")
		return nil
	}
	shim, err := statusField(strconv.Itoa(d.t.PID), "PPid")
	if err != nil {
		d.log.Warn().Err(err).Msg("checkpoint-rootfs: the container runtime's process; deleted paths are not carried")
		return nil
	}
	u, err := confine.OpenRoot("/proc/" + shim + "/root" + upper)
	if err != nil {
		d.log.Warn().Err(err).Msg("checkpoint-rootfs: the overlay's upper directory; deleted paths are not carried")
		return nil
	}
	defer u.Close()
	var all, out []string
	if err := deletedPaths(u, "/", 0, &all); err != nil {
		d.log.Warn().Err(err).Msg("checkpoint-rootfs: reading deletions")
		return nil
	}
	for _, p := range all {
		if checkpoint.ValidFilePath(p) == nil && !under(p, d.c.Files) {
			out = append(out, p)
		}
	}
	return out
}

// dirMeta reads the owner and mode of each directory, resolved inside the container's root.
func (d *dump) dirMeta(dirs map[string]bool) []checkpoint.CarriedDir {
	var out []checkpoint.CarriedDir
	for p := range dirs {
		if checkpoint.ValidFilePath(p) != nil {
			continue
		}
		f, err := confine.Open(d.root, p, unix.O_PATH|unix.O_DIRECTORY)
		if err != nil {
			continue
		}
		st, err := confine.Stat(f)
		f.Close()
		if err == nil {
			out = append(out, checkpoint.CarriedDir{Path: p, Mode: st.Mode & 0o7777, UID: int(st.Uid), GID: int(st.Gid)})
		}
	}
	return out
}

// under reports whether p is one of roots or below one.
func under(p string, roots []string) bool {
	for _, r := range roots {
		r = path.Clean(r)
		if p == r || strings.HasPrefix(p, r+"/") {
			return true
		}
	}
	return false
}
