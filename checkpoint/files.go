package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/internal/confine"
)

// CopyLimits caps what CopyIn copies out of a container: the checkpoint-files paths are the
// pod's to choose, and the agent must not fill the checkpoint volume (or spend its time) on a tree
// a pod made huge. Zero means no cap.
type CopyLimits struct {
	Bytes   int64 // total size of the regular files copied, all paths together
	Entries int   // files, directories and symlinks copied, all paths together
}

// DefaultCopyLimits is what CopyIn applies when the agent is given no other setting.
var DefaultCopyLimits = CopyLimits{Bytes: 1 << 30, Entries: 100_000}

// forbiddenRoots are the trees no checkpoint-files path may name: the kernel's views (the agent
// reads as root what the app may not) and Stasis' own mounts. /dev/shm is the exception under
// /dev: a tmpfs of plain files (POSIX shared memory) that is the app's data.
var forbiddenRoots = []string{"/proc", "/sys", "/dev", "/stasis"}

// devShm is the one tree under /dev that holds app data.
const devShm = "/dev/shm"

// ValidFilePath checks a checkpoint-files path: absolute, clean, not the root, no "..", not under
// /proc, /sys, /dev (but /dev/shm) or /stasis.
func ValidFilePath(p string) error {
	switch {
	case !path.IsAbs(p):
		return fmt.Errorf("checkpoint file %q: not an absolute path", p)
	case path.Clean(p) != p || strings.Contains(p, "/../") || strings.HasSuffix(p, "/.."):
		return fmt.Errorf("checkpoint file %q: not a clean path", p)
	case p == "/":
		return fmt.Errorf("checkpoint file %q: the whole root cannot be copied", p)
	}
	for _, r := range forbiddenRoots {
		if strings.HasPrefix(p, devShm+"/") {
			break
		}
		if p == r || strings.HasPrefix(p, r+"/") {
			return fmt.Errorf("checkpoint file %q: paths under %s are refused", p, r)
		}
	}
	return nil
}

// Validate checks a CopiedFile of a manifest before it is used: a valid Path, and Stored relative
// and inside files/ (or empty when Missing).
func (c CopiedFile) Validate() error {
	if err := ValidFilePath(c.Path); err != nil {
		return err
	}
	if c.Missing && c.Stored == "" {
		return nil
	}
	if !safeRel(c.Stored) || !strings.HasPrefix(c.Stored, FilesDir+"/") {
		return fmt.Errorf("checkpoint file %s: stored path %q is not inside %s/", c.Path, c.Stored, FilesDir)
	}
	return nil
}

// CopyIn copies the checkpoint-files paths (absolute, as seen in the container) from the container
// whose root is at root (a trusted path such as /proc/<pid>/root) into ckpt/files/, with
// DefaultCopyLimits. The agent uses Writer.CopyIn; this is for trusted paths (tests, tools).
func CopyIn(root string, paths []string, ckpt string) ([]CopiedFile, error) {
	r, err := confine.OpenRoot(root)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	d, err := confine.OpenRoot(ckpt)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	return copyIn(context.Background(), r, paths, d, DefaultCopyLimits)
}

// CopyIn copies the checkpoint-files paths (absolute, as seen in the container) from the
// container whose root directory is root (a descriptor, see confine.OpenRoot) into files/ of the
// checkpoint. Each path is resolved inside root (its symlinks too: never onto the host); below it
// everything is copied by descriptor, symlinks as symlinks, never followed; lim caps the total. A
// path that does not exist is recorded as missing (the app may not have created it yet).
func (w *Writer) CopyIn(root *os.File, paths []string, lim CopyLimits) ([]CopiedFile, error) {
	return copyIn(w.context(), root, paths, w.tmp, lim)
}

func copyIn(ctx context.Context, root *os.File, paths []string, ckpt *os.File, lim CopyLimits) ([]CopiedFile, error) {
	var out []CopiedFile
	c := &copier{ctx: ctx, lim: lim, chown: os.Geteuid() == 0, pseudoCheck: true}
	for _, p := range paths {
		clean := path.Clean(p)
		if err := ValidFilePath(clean); err != nil {
			return nil, err
		}
		src, err := confine.Open(root, clean, unix.O_PATH)
		if errors.Is(err, fs.ErrNotExist) {
			out = append(out, CopiedFile{Path: clean, Missing: true})
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("checkpoint file %s: %w", clean, err)
		}
		stored := StoredPath(clean)
		c.top = clean
		err = copyToStored(c, src, ckpt, stored)
		src.Close()
		if err != nil {
			return nil, fmt.Errorf("checkpoint file %s: %w", clean, err)
		}
		out = append(out, CopiedFile{Path: clean, Stored: stored})
	}
	return out, nil
}

// copyToStored copies src to stored (files/<path>) below ckpt, creating the parents without
// following anything.
func copyToStored(c *copier, src, ckpt *os.File, stored string) error {
	parent, err := confine.MkdirAllBeneath(ckpt, path.Dir(stored), 0o700)
	if err != nil {
		return err
	}
	defer parent.Close()
	return c.copy(src, parent, path.Base(stored), c.top, 0)
}

// PutBack copies the checkpoint's files back to their places below root ("/" inside the
// container), replacing what is there. Both are trusted paths; see PutBackAt.
func PutBack(ckpt string, m *Manifest, root string) error {
	r, err := confine.OpenRoot(root)
	if err != nil {
		return err
	}
	defer r.Close()
	d, err := confine.OpenRoot(ckpt)
	if err != nil {
		return err
	}
	defer d.Close()
	return PutBackAt(d, m, r)
}

// PutBackAt copies the checkpoint's files (ckpt: the checkpoint's directory) back to their places
// inside root, replacing what is there. Every CopiedFile is validated first (a manifest is data);
// each place is resolved inside root, what was there is removed by descriptor (never through a
// symlink, never across a mount), and the stored copy is read without following any symlink.
func PutBackAt(ckpt *os.File, m *Manifest, root *os.File) error {
	for _, c := range m.CopiedFiles {
		if err := c.Validate(); err != nil {
			return err
		}
	}
	for _, c := range m.CopiedFiles {
		if c.Missing || c.Stored == "" {
			continue
		}
		if err := putBack(ckpt, c, root); err != nil {
			return fmt.Errorf("checkpoint file %s: %w", c.Path, err)
		}
	}
	return nil
}

func putBack(ckpt *os.File, c CopiedFile, root *os.File) error {
	src, err := confine.OpenBeneath(ckpt, c.Stored, unix.O_PATH)
	if err != nil {
		return err
	}
	defer src.Close()
	parent, err := confine.MkdirAll(root, path.Dir(c.Path), 0o755)
	if err != nil {
		return err
	}
	defer parent.Close()
	name := path.Base(c.Path)
	if err := confine.RemoveAll(parent, name); err != nil {
		return err
	}
	cp := &copier{chown: os.Geteuid() == 0, top: c.Path}
	return cp.copy(src, parent, name, c.Path, 0)
}

// StoredPath is where a checkpoint-files path is kept inside a checkpoint.
func StoredPath(abs string) string {
	return path.Join(FilesDir, strings.TrimPrefix(path.Clean("/"+abs), "/"))
}
