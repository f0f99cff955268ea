package checkpoint

import (
	"errors"
	"fmt"
	"os"
	"path"
	"sort"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/internal/confine"
)

// CarriedFilesDir holds, inside a checkpoint, the files the agent carried on its own (see
// CarriedFile); FilesDir holds the ones the user listed.
const CarriedFilesDir = "carried"

// CarriedFile is a regular file the dumped tree held open or mapped that a new container of the
// same image would not have (it lived in the container's writable layer, its /dev/shm or an
// emptyDir volume): CRIU reopens such files by path at restore, so the checkpoint carries them.
type CarriedFile struct {
	Path   string `json:"path"`   // absolute, as the tree saw it
	Stored string `json:"stored"` // relative path below the checkpoint, inside carried/
	Size   int64  `json:"size"`
	// Reason says why it was carried ("open in the writable layer", "mapped from tmpfs /dev/shm").
	Reason string `json:"reason"`
}

// CarriedDir is a directory the restored tree needs (the parent of a carried file, a process'
// working directory): created with this owner and mode where the new container lacks it.
type CarriedDir struct {
	Path string `json:"path"`
	Mode uint32 `json:"mode"` // permission bits
	UID  int    `json:"uid"`
	GID  int    `json:"gid"`
}

// Validate checks a CarriedFile of a manifest before it is used.
func (c CarriedFile) Validate() error {
	if err := ValidFilePath(c.Path); err != nil {
		return err
	}
	if c.Stored != carriedStoredPath(c.Path) {
		return fmt.Errorf("carried file %s: stored path %q is not %s", c.Path, c.Stored, carriedStoredPath(c.Path))
	}
	return nil
}

// Validate checks a CarriedDir of a manifest before it is used.
func (d CarriedDir) Validate() error {
	if err := ValidFilePath(d.Path); err != nil {
		return err
	}
	if d.Mode&^uint32(0o7777) != 0 {
		return fmt.Errorf("carried directory %s: mode %#o is not permission bits", d.Path, d.Mode)
	}
	return nil
}

func carriedStoredPath(abs string) string {
	return path.Join(CarriedFilesDir, strings.TrimPrefix(path.Clean("/"+abs), "/"))
}

// Carrier copies held files into a checkpoint being written, all of them under one cap.
type Carrier struct {
	w     *Writer
	c     *copier
	Files []CarriedFile
}

// Carrier returns a carrier for this checkpoint; lim caps everything it carries together.
func (w *Writer) Carrier(lim CopyLimits) *Carrier {
	return &Carrier{w: w, c: &copier{ctx: w.context(), lim: lim, chown: os.Geteuid() == 0, pseudoCheck: true}}
}

// Carry copies src, a descriptor of the very file the tree holds (opened through
// /proc/<pid>/fd/N or map_files: no path is looked up) or an O_PATH descriptor of a file or
// symlink found by a walk, as the container path p, with its mode, owner and mtime.
func (c *Carrier) Carry(src *os.File, p, reason string) error {
	cf := CarriedFile{Path: path.Clean(p), Reason: reason}
	cf.Stored = carriedStoredPath(cf.Path)
	if err := cf.Validate(); err != nil {
		return err
	}
	st, err := confine.Stat(src)
	if err != nil {
		return err
	}
	if !confine.IsReg(&st) && !confine.IsLink(&st) {
		return fmt.Errorf("carried file %s: not a regular file or a symlink", p)
	}
	cf.Size = st.Size
	c.c.top = cf.Path
	if err := copyToStored(c.c, src, c.w.tmp, cf.Stored); err != nil {
		return fmt.Errorf("carrying %s (%s): %w", cf.Path, reason, err)
	}
	c.Files = append(c.Files, cf)
	return nil
}

// Bytes is what the carrier copied so far.
func (c *Carrier) Bytes() int64 { return c.c.bytes }

// PutBackCarriedAt recreates, inside root, the container's filesystem state the checkpoint (ckpt:
// its directory) carried: the deleted paths removed, directories created where missing with their
// recorded owner and mode, files replacing what is there (a new container of the image has an
// older version, or none). Every entry is validated first (a manifest is data) and resolved
// inside root; removals never cross a mount.
func PutBackCarriedAt(ckpt *os.File, m *Manifest, root *os.File) error {
	if err := m.validatePaths(); err != nil {
		return err
	}
	for _, p := range m.Deleted {
		if err := removeIn(root, p); err != nil {
			return fmt.Errorf("deleted path %s: %w", p, err)
		}
	}
	dirs := append([]CarriedDir(nil), m.CarriedDirs...)
	sort.Slice(dirs, func(i, j int) bool { return dirs[i].Path < dirs[j].Path }) // parents first
	for _, d := range dirs {
		if err := ensureDir(root, d); err != nil {
			return fmt.Errorf("carried directory %s: %w", d.Path, err)
		}
	}
	for _, f := range m.Carried {
		if err := putBack(ckpt, CopiedFile{Path: f.Path, Stored: f.Stored}, root); err != nil {
			return fmt.Errorf("carried file %s: %w", f.Path, err)
		}
	}
	return nil
}

// removeIn removes p, resolved inside root, if it is there.
func removeIn(root *os.File, p string) error {
	parent, err := confine.Open(root, path.Dir(p), unix.O_RDONLY|unix.O_DIRECTORY)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return err
	}
	defer parent.Close()
	return confine.RemoveAll(parent, path.Base(p))
}

// ensureDir creates d.Path inside root if it is missing, with d's mode and owner.
func ensureDir(root *os.File, d CarriedDir) error {
	f, err := confine.Open(root, d.Path, unix.O_PATH)
	if err == nil {
		return f.Close()
	}
	if !errors.Is(err, unix.ENOENT) {
		return err
	}
	parent, err := confine.MkdirAll(root, path.Dir(d.Path), 0o755)
	if err != nil {
		return err
	}
	defer parent.Close()
	dir, err := confine.Mkdirat(parent, path.Base(d.Path), 0o700)
	if err != nil {
		return err
	}
	defer dir.Close()
	if err := unix.Fchmod(int(dir.Fd()), d.Mode); err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		return nil
	}
	return unix.Fchown(int(dir.Fd()), d.UID, d.GID)
}

// validatePaths checks every container path the manifest names (copied, carried) before any is
// used.
func (m *Manifest) validatePaths() error {
	for _, c := range m.CopiedFiles {
		if err := c.Validate(); err != nil {
			return err
		}
	}
	for _, f := range m.Carried {
		if err := f.Validate(); err != nil {
			return err
		}
	}
	for _, d := range m.CarriedDirs {
		if err := d.Validate(); err != nil {
			return err
		}
	}
	for _, p := range m.Deleted {
		if err := ValidFilePath(p); err != nil {
			return fmt.Errorf("deleted path: %w", err)
		}
	}
	return nil
}
