package agent

import (
	"errors"
	"fmt"
	"os"
	"path"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/checkpoint"
	"github.com/stasis-k8s/stasis/internal/confine"
)

// The writable layer's changes (checkpoint-rootfs): what Podman archives as rootfs-diff. Without
// the option only the files the tree holds travel (carry.go); with it, every path of the root
// filesystem created or modified since the container started, and the image paths it deleted.

// changedReason is the Reason of a carried file found by the rootfs walk.
const changedReason = "changed in the writable layer (checkpoint-rootfs)"

// rootfsWalk collects the changes of one container's root filesystem.
type rootfsWalk struct {
	c     *checkpoint.Carrier
	since time.Time
	mnt   uint64   // the root's mount: the walk never enters another
	skip  []string // paths left out: checkpoint-files (the user's copy wins), Stasis' own
	dirs  map[string]bool
}

// maxRootfsDepth bounds the walk (one descriptor per level).
const maxRootfsDepth = 128

// carryRootfs carries every regular file and symlink of the root filesystem changed since the
// container started (content, mode, owner) and records every changed directory. Files already
// carried because the tree holds them are not copied twice.
func (d *dump) carryRootfs(c *checkpoint.Carrier, since time.Time, listed []string, dirs map[string]bool) error {
	var stx unix.Statx_t
	if err := unix.Statx(int(d.root.Fd()), "", unix.AT_EMPTY_PATH, unix.STATX_MNT_ID, &stx); err != nil {
		return fmt.Errorf("the container's root: %w", err)
	}
	skip := append([]string{"/proc", "/sys", "/dev", "/stasis"}, listed...)
	for _, f := range c.Files {
		skip = append(skip, f.Path)
	}
	w := &rootfsWalk{c: c, since: since, mnt: stx.Mnt_id, skip: skip, dirs: dirs}
	if err := w.walk(d.root, "/", 0); err != nil {
		return fmt.Errorf("the checkpoint would not restore: the writable layer's changes: %w", err)
	}
	return nil
}

func (w *rootfsWalk) walk(dir *os.File, at string, depth int) error {
	if depth > maxRootfsDepth {
		return fmt.Errorf("%s: more than %d directories deep", at, maxRootfsDepth)
	}
	entries, err := confine.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("%s: %w", at, err)
	}
	for _, e := range entries {
		p := path.Join(at, e.Name)
		if under(p, w.skip) || !(e.IsDir() || e.IsReg() || e.IsLink()) {
			continue
		}
		f, err := confine.OpenEntry(dir, e.Name, unix.O_PATH)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		err = w.entry(f, p, depth)
		f.Close()
		if err != nil {
			return err
		}
	}
	return nil
}

// entry handles one path: a directory on the root's mount is recorded if changed and walked; a
// changed file or symlink is carried. Type and ctime are the descriptor's own (fstat of what was
// opened without following), not the listing's: a process of the pod may swap the entry between
// the two, and a symlink must never be entered as a directory.
func (w *rootfsWalk) entry(f *os.File, p string, depth int) error {
	var stx unix.Statx_t
	if err := unix.Statx(int(f.Fd()), "", unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW, unix.STATX_BASIC_STATS|unix.STATX_MNT_ID, &stx); err != nil {
		return fmt.Errorf("%s: %w", p, err)
	}
	if stx.Mnt_id != w.mnt {
		return nil // a volume or the runtime's mount: not the writable layer
	}
	changed := !time.Unix(stx.Ctime.Sec, int64(stx.Ctime.Nsec)).Before(w.since)
	switch stx.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
	case unix.S_IFREG, unix.S_IFLNK:
		if !changed {
			return nil
		}
		return w.c.Carry(f, p, changedReason)
	default:
		return nil
	}
	if changed {
		w.dirs[p] = true
	}
	d, err := confine.Reopen(f, unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return err
	}
	defer d.Close()
	return w.walk(d, p, depth+1)
}

// overlayUpper returns the upper directory of an overlay mount's options ("" if none).
func overlayUpper(superOpts string) string {
	for _, o := range splitOpts(superOpts) {
		if v, ok := strings.CutPrefix(o, "upperdir="); ok {
			return v
		}
	}
	return ""
}

// splitOpts splits mount options at commas that are not escaped ("\,", as overlay writes them).
func splitOpts(s string) []string {
	var out []string
	var cur strings.Builder
	for i := 0; i < len(s); i++ {
		switch {
		case s[i] == '\\' && i+1 < len(s):
			cur.WriteByte(s[i+1])
			i++
		case s[i] == ',':
			out = append(out, cur.String())
			cur.Reset()
		default:
			cur.WriteByte(s[i])
		}
	}
	return append(out, cur.String())
}

// deletedPaths lists the paths an overlay's upper directory marks deleted: whiteouts (character
// devices 0/0) and opaque directories (the image's content below them is gone). upper is a
// descriptor of the upper directory; the walk follows nothing and stays on its filesystem.
func deletedPaths(upper *os.File, at string, depth int, out *[]string) error {
	if depth > maxRootfsDepth {
		return fmt.Errorf("%s: more than %d directories deep", at, maxRootfsDepth)
	}
	entries, err := confine.ReadDir(upper)
	if err != nil {
		return fmt.Errorf("%s: %w", at, err)
	}
	for _, e := range entries {
		p := path.Join(at, e.Name)
		switch {
		case e.Mode&unix.S_IFMT == unix.S_IFCHR && e.Rdev == 0:
			*out = append(*out, p)
		case e.IsDir():
			d, err := confine.OpenEntry(upper, e.Name, unix.O_RDONLY|unix.O_DIRECTORY)
			if err != nil {
				return err
			}
			if opaque(d) {
				*out = append(*out, p)
			}
			err = deletedPaths(d, p, depth+1, out)
			d.Close()
			if err != nil {
				return err
			}
		}
	}
	return nil
}

// opaque reports overlay's opaque mark on a directory of the upper layer.
func opaque(d *os.File) bool {
	buf := make([]byte, 4)
	for _, attr := range []string{"trusted.overlay.opaque", "user.overlay.opaque"} {
		if n, err := unix.Fgetxattr(int(d.Fd()), attr, buf); err == nil && n == 1 && buf[0] == 'y' {
			return true
		}
	}
	return false
}
