package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/internal/confine"
)

// copier copies a tree from one descriptor to a name in a directory descriptor: the source is
// walked with O_NOFOLLOW entry by entry (a symlink is copied as a symlink, never followed), the
// destination is created with mkdirat/O_EXCL/symlinkat relative to directories the copier itself
// created or was given. Nothing is looked up by path.
type copier struct {
	ctx         context.Context // nil: no deadline
	lim         CopyLimits
	bytes       int64 // copied so far
	entries     int
	chown       bool   // keep the owner (root only)
	top         string // the checkpoint-files path being copied, for errors
	pseudoCheck bool   // refuse files of the kernel's pseudo filesystems (reading the container)
}

// maxCopyDepth bounds the recursion (one descriptor per level).
const maxCopyDepth = 256

// copy copies src (any descriptor, O_PATH included, of a file, directory or symlink) as name in
// dstDir. shown is the source's path for errors.
func (c *copier) copy(src, dstDir *os.File, name, shown string, depth int) error {
	st, err := confine.Stat(src)
	if err != nil {
		return err
	}
	if c.entries++; c.lim.Entries > 0 && c.entries > c.lim.Entries {
		return fmt.Errorf("%s: more than %d files, directories and symlinks to copy (the cap on checkpoint files)", c.top, c.lim.Entries)
	}
	if depth > maxCopyDepth {
		return fmt.Errorf("%s: more than %d directories deep", shown, maxCopyDepth)
	}
	if c.pseudoCheck {
		if err := notPseudoFS(src, shown); err != nil {
			return err
		}
	}
	switch {
	case confine.IsLink(&st):
		return c.copySymlink(src, &st, dstDir, name, shown)
	case confine.IsDir(&st):
		return c.copyDir(src, &st, dstDir, name, shown, depth)
	case confine.IsReg(&st):
		return c.copyFile(src, &st, dstDir, name, shown)
	default:
		return fmt.Errorf("%s: unsupported file type (mode %#o)", shown, st.Mode&unix.S_IFMT)
	}
}

func (c *copier) copySymlink(src *os.File, st *unix.Stat_t, dstDir *os.File, name, shown string) error {
	buf := make([]byte, unix.PathMax)
	n, err := unix.Readlinkat(int(src.Fd()), "", buf)
	if err != nil {
		return fmt.Errorf("readlink %s: %w", shown, err)
	}
	err = unix.Symlinkat(string(buf[:n]), int(dstDir.Fd()), name)
	if err == unix.EEXIST {
		if err = confine.RemoveAll(dstDir, name); err == nil {
			err = unix.Symlinkat(string(buf[:n]), int(dstDir.Fd()), name)
		}
	}
	if err != nil {
		return fmt.Errorf("symlink %s: %w", shown, err)
	}
	if c.chown {
		// Fchownat without following: the link itself, whatever a racer made it point to.
		return unix.Fchownat(int(dstDir.Fd()), name, int(st.Uid), int(st.Gid), unix.AT_SYMLINK_NOFOLLOW)
	}
	return nil
}

func (c *copier) copyDir(src *os.File, st *unix.Stat_t, dstDir *os.File, name, shown string, depth int) error {
	// "." from an O_PATH descriptor of a directory opens that very directory for reading.
	sd, err := confine.OpenBeneath(src, ".", unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return err
	}
	defer sd.Close()
	dd, err := confine.Mkdirat(dstDir, name, 0o700)
	if errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP) { // a file or symlink there
		if err = confine.RemoveAll(dstDir, name); err == nil {
			dd, err = confine.Mkdirat(dstDir, name, 0o700)
		}
	}
	if err != nil {
		return err
	}
	defer dd.Close()
	names, err := sd.Readdirnames(-1)
	if err != nil {
		return fmt.Errorf("%s: %w", shown, err)
	}
	for _, n := range names {
		child, err := confine.OpenEntry(sd, n, unix.O_PATH)
		if errors.Is(err, os.ErrNotExist) {
			continue // removed meanwhile
		}
		if err != nil {
			return err
		}
		err = c.copy(child, dd, n, shown+"/"+n, depth+1)
		child.Close()
		if err != nil {
			return err
		}
	}
	if err := unix.Fchmod(int(dd.Fd()), st.Mode&0o7777); err != nil {
		return err
	}
	return c.own(dd, st)
}

func (c *copier) copyFile(src *os.File, st *unix.Stat_t, dstDir *os.File, name, shown string) error {
	if c.lim.Bytes > 0 && c.bytes+st.Size > c.lim.Bytes {
		return c.tooBig()
	}
	in, err := confine.Reopen(src, unix.O_RDONLY|unix.O_NONBLOCK)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := confine.CreateEntry(dstDir, name, 0o600)
	if errors.Is(err, os.ErrExist) {
		if err = confine.RemoveAll(dstDir, name); err == nil {
			out, err = confine.CreateEntry(dstDir, name, 0o600)
		}
	}
	if err != nil {
		return err
	}
	defer out.Close()
	// The file may grow while it is copied (a process of the pod writes it): the cap holds on
	// what is read, not on the size seen before.
	var r io.Reader = in
	if c.ctx != nil {
		r = ctxReader{c.ctx, in}
	}
	if c.lim.Bytes > 0 {
		r = io.LimitReader(r, c.lim.Bytes-c.bytes+1)
	}
	n, err := io.CopyBuffer(out, r, make([]byte, 1<<20))
	c.bytes += n
	if err != nil {
		return fmt.Errorf("copying %s: %w", shown, err)
	}
	if c.lim.Bytes > 0 && c.bytes > c.lim.Bytes {
		return c.tooBig()
	}
	if err := unix.Fchmod(int(out.Fd()), st.Mode&0o7777); err != nil {
		return err
	}
	// utimensat on the descriptor's own /proc/self/fd link: that inode, nothing looked up.
	times := []unix.Timespec{st.Mtim, st.Mtim}
	if err := unix.UtimesNanoAt(unix.AT_FDCWD, fmt.Sprintf("/proc/self/fd/%d", out.Fd()), times, 0); err != nil {
		return fmt.Errorf("setting the times of %s: %w", shown, err)
	}
	if err := c.own(out, st); err != nil {
		return err
	}
	return out.Close()
}

func (c *copier) own(f *os.File, st *unix.Stat_t) error {
	if !c.chown {
		return nil
	}
	return unix.Fchown(int(f.Fd()), int(st.Uid), int(st.Gid))
}

func (c *copier) tooBig() error {
	return fmt.Errorf("%s: more than %d bytes to copy (the cap on checkpoint files)", c.top, c.lim.Bytes)
}

// pseudoFS are the kernel's filesystems a container's checkpoint-files must not reach through a
// symlink or a mount: read as root by the agent, they would hand the pod what its own user (or
// the container's masked paths) may not read.
var pseudoFS = map[int64]string{
	unix.PROC_SUPER_MAGIC: "proc", unix.SYSFS_MAGIC: "sysfs", unix.DEBUGFS_MAGIC: "debugfs",
	unix.TRACEFS_MAGIC: "tracefs", unix.SECURITYFS_MAGIC: "securityfs", unix.CGROUP2_SUPER_MAGIC: "cgroup2",
	unix.CGROUP_SUPER_MAGIC: "cgroup", unix.BPF_FS_MAGIC: "bpf", unix.EFIVARFS_MAGIC: "efivarfs",
	unix.DEVPTS_SUPER_MAGIC: "devpts",
}

func notPseudoFS(f *os.File, shown string) error {
	var sfs unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &sfs); err != nil {
		return fmt.Errorf("statfs %s: %w", shown, err)
	}
	if name, ok := pseudoFS[int64(sfs.Type)]; ok {
		return fmt.Errorf("%s: on a %s filesystem, refused", shown, name)
	}
	return nil
}
