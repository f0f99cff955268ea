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

// Helpers for the agent around CRIU: the only things it needs by path are the ones CRIU opens
// inside the container's mount namespace; everything the agent does itself goes through the
// writer's descriptors.

// imagesLinkName is the symlink LinkImages makes beside the temporary directory.
func (w *Writer) imagesLinkName() string { return w.TmpName() + ".images" }

// LinkImages makes the symlink <dir>/.tmp-<id>.images → <ctrDir>/.tmp-<id>/images in the
// checkpoint directory and returns its path as seen in the container (ctrDir: the checkpoint
// directory's path in the container). CRIU's RPC readlink()s the images directory it is given
// (it expects /proc/<pid>/fd/<n>, which cannot work across PID namespaces): it gets this link.
// The agent never follows it; Commit and Abort remove it.
func (w *Writer) LinkImages(ctrDir string) (string, error) {
	target := path.Join(ctrDir, w.TmpName(), ImagesDir)
	if err := unix.Symlinkat(target, int(w.dir.Fd()), w.imagesLinkName()); err != nil {
		return "", fmt.Errorf("linking the images directory: %w", err)
	}
	w.linked = true
	return path.Join(ctrDir, w.imagesLinkName()), nil
}

// unlinkImages removes LinkImages' link (unlinkat removes a name, never what it points to).
func (w *Writer) unlinkImages() {
	if w.linked {
		_ = unix.Unlinkat(int(w.dir.Fd()), w.imagesLinkName(), 0)
		w.linked = false
	}
}

// CheckContainerPath checks that ctrImages (a path in the container, such as LinkImages' link)
// resolves, inside the container's root, to the images directory this writer created. Call it
// before CRIU (the path CRIU is handed is ours) and after (CRIU wrote where the agent reads): a
// pod that swapped a component in between makes the dump fail instead of the agent hashing and
// committing a directory it did not make.
func (w *Writer) CheckContainerPath(root *os.File, ctrImages string) error {
	d, err := confine.Open(root, ctrImages, unix.O_PATH|unix.O_DIRECTORY)
	if err != nil {
		return fmt.Errorf("images directory %s in the container: %w", ctrImages, err)
	}
	defer d.Close()
	got, err := confine.Stat(d)
	if err != nil {
		return err
	}
	want, err := confine.Stat(w.images)
	if err != nil {
		return err
	}
	if !confine.Same(&got, &want) {
		return fmt.Errorf("images directory %s in the container is not the one this dump created (dev/ino %d/%d, want %d/%d): replaced during the dump",
			ctrImages, got.Dev, got.Ino, want.Dev, want.Ino)
	}
	return nil
}

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
