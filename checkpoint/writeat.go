package checkpoint

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"

	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/internal/confine"
)

// Helpers for the agent around CRIU: everything, CRIU's images directory included, goes through
// the writer's descriptors.

// Images is the images directory this writer created, for CRIU: the agent hands it over as an
// inherited descriptor (/proc/self/fd/N to CRIU), so no path in the pod's reach is involved.
func (w *Writer) Images() *os.File { return w.images }

// WriteFile writes rel (a path below the temporary directory, e.g. "criu.conf") anew, 0600,
// through descriptors.
func (w *Writer) WriteFile(rel string, data []byte) error {
	d, err := confine.OpenBeneath(w.tmp, path.Dir(rel), unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return err
	}
	defer d.Close()
	return writeFileSync(d, path.Base(rel), data)
}

// OpenFile opens rel below the temporary directory for reading: a regular file reached without
// any symlink (e.g. "images/dump.log" for CRIU's error tail). A pod cannot make the agent read a
// host file through it.
func (w *Writer) OpenFile(rel string) (*os.File, error) {
	f, _, err := openRegular(w.tmp, rel)
	return f, err
}

// KeepLog moves CRIU's log out of the images into the checkpoint (images/dump.log → dump.log).
func (w *Writer) KeepLog() error {
	if err := unix.Renameat(int(w.images.Fd()), DumpLogName, int(w.tmp.Fd()), DumpLogName); err != nil {
		return fmt.Errorf("moving %s out of the images: %w", DumpLogName, err)
	}
	return nil
}

// Written is the size of the regular files written so far (progress while CRIU writes).
func (w *Writer) Written() int64 {
	var n int64
	if w.pack != nil {
		n += w.pack.in.Load()
	}
	_ = walkTree(w.tmp, func(_ string, st *unix.Stat_t) error {
		if confine.IsReg(st) {
			n += st.Size
		}
		return nil
	})
	return n
}

// Chown gives the checkpoint directory and the committed checkpoint to uid:gid (the launcher of
// the next pod reads it as the app's user). Entries are changed with fchownat(AT_SYMLINK_NOFOLLOW)
// relative to directories walked by descriptor from the one this writer created: a symlink is
// changed itself, never what it points to.
func (w *Writer) Chown(uid, gid int) error {
	var errs []error
	for _, f := range []*os.File{w.dir, w.tmp} {
		if err := unix.Fchown(int(f.Fd()), uid, gid); err != nil {
			errs = append(errs, fmt.Errorf("chown %s: %w", f.Name(), err))
		}
	}
	err := walkDirAt(w.tmp, "", func(d *os.File, name, rel string, _ *unix.Stat_t) error {
		err := unix.Fchownat(int(d.Fd()), name, uid, gid, unix.AT_SYMLINK_NOFOLLOW)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("chown %s: %w", rel, err)
		}
		return nil
	})
	return errors.Join(append(errs, err)...)
}
