package checkpoint

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/internal/confine"
)

// Writer builds one checkpoint in a temporary directory; Commit makes it complete, Abort drops it.
//
// It works on descriptors: the checkpoint directory as the caller opened it (confined inside the
// container's root, see confine.MkdirAll) and the temporary directory it created below it. Every
// later step (writing, hashing, renaming into place, the marker, removal) is relative to those
// descriptors, so a process of the pod that swaps a path component for a symlink meanwhile cannot
// make the agent write, read or remove anything else.
type Writer struct {
	// Dir is the checkpoint directory's path when it was given as a path (Begin), for messages and
	// Path/Final; empty when begun from a descriptor (BeginAt).
	Dir string
	ID  string
	// Key authenticates the manifest (the completion marker is its HMAC); nil: a plain sha256
	// (tests and tools; the agent always sets its key).
	Key Key

	dir    *os.File    // the checkpoint directory
	tmp    *os.File    // .tmp-<id>, created by Begin, renamed to <id> by Commit
	images *os.File    // tmp/images, created by Begin
	tmpSt  unix.Stat_t // tmp's identity, to recognise it by name

	fl   *follower          // hashing the images while CRIU writes them (FollowImages)
	pack *packSink          // the images as chunks (Pack), when streamed
	sums map[string]FileSum // what the follower hashed, once the writer exited
	ctx  context.Context    // copying, hashing and syncing stop when it ends (Within)
}

// Within bounds the writer's own work (copying files in, hashing, syncing) by ctx: a checkpoint
// that cannot be finished within the operation's deadline fails instead of holding the eviction.
func (w *Writer) Within(ctx context.Context) { w.ctx = ctx }

func (w *Writer) context() context.Context {
	if w.ctx == nil {
		return context.Background()
	}
	return w.ctx
}

// ctxReader fails reads once its context has ended.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, fmt.Errorf("stopped: %w", err)
	}
	return c.r.Read(p)
}

// Begin creates <dir> (a trusted path: tests and tools; the agent uses BeginAt) and calls BeginAt.
func Begin(dir, id string) (*Writer, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating checkpoint directory: %w", err)
	}
	d, err := os.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, fmt.Errorf("opening checkpoint directory: %w", err)
	}
	defer d.Close()
	w, err := BeginAt(d, id)
	if err != nil {
		return nil, err
	}
	w.Dir = dir
	return w, nil
}

// BeginAt creates .tmp-<id>/images below the checkpoint directory dir (a descriptor: the writer
// keeps its own duplicate, the caller may close dir). Checkpoints hold process memory (secrets):
// 0700. Close releases the writer's descriptors once it is committed (Abort does it itself).
func BeginAt(dir *os.File, id string) (*Writer, error) {
	if !ValidID(id) {
		return nil, fmt.Errorf("checkpoint id %q is not a valid directory name", id)
	}
	w := &Writer{ID: id}
	// The writer's own descriptor of the same directory, readable (dir may be O_PATH): fsync needs it.
	var err error
	if w.dir, err = confine.OpenBeneath(dir, ".", unix.O_RDONLY|unix.O_DIRECTORY); err != nil {
		return nil, fmt.Errorf("checkpoint directory %s: %w", dir.Name(), err)
	}
	if err := unix.Mkdirat(int(w.dir.Fd()), w.TmpName(), 0o700); err != nil {
		w.dir.Close()
		return nil, fmt.Errorf("creating %s in the checkpoint directory: %w", w.TmpName(), err)
	}
	// Opened by name right after mkdirat: O_NOFOLLOW refuses a symlink swapped in meanwhile, and a
	// directory swapped in must be empty like ours (then it is as harmless as ours).
	if w.tmp, err = confine.OpenEntry(w.dir, w.TmpName(), unix.O_RDONLY|unix.O_DIRECTORY); err == nil {
		w.tmpSt, err = confine.Stat(w.tmp)
	}
	if err == nil {
		if names, rerr := confine.ReadDirNames(w.tmp); rerr != nil || len(names) > 0 {
			err = errors.Join(rerr, fmt.Errorf("%s is not the empty directory just created", w.TmpName()))
		}
	}
	if err == nil {
		w.images, err = confine.Mkdirat(w.tmp, ImagesDir, 0o700)
	}
	if err != nil {
		w.Close()
		return nil, fmt.Errorf("creating the checkpoint directory: %w", err)
	}
	return w, nil
}

// Close releases the writer's descriptors.
func (w *Writer) Close() error {
	for _, f := range []*os.File{w.images, w.tmp, w.dir} {
		if f != nil {
			f.Close()
		}
	}
	w.images, w.tmp, w.dir = nil, nil, nil
	if w.pack != nil {
		w.pack.release()
	}
	return nil
}

// Path is the temporary directory being written (the committed one after Commit), as a path the
// agent can hand to tools: below Dir when begun from a path, else /proc/self/fd/<n>, which names
// the directory the writer created and nothing else. Paths below it are looked up by name: the
// agent itself uses the writer's methods.
func (w *Writer) Path() string {
	if w.Dir != "" {
		return filepath.Join(w.Dir, tmpPrefix+w.ID)
	}
	return fmt.Sprintf("/proc/self/fd/%d", w.tmp.Fd())
}

// TmpName is the temporary directory's name in the checkpoint directory (to build the same path
// as seen in a container).
func (w *Writer) TmpName() string { return tmpPrefix + w.ID }

// Final is where the checkpoint lives once committed (see Path).
func (w *Writer) Final() string {
	if w.Dir != "" {
		return filepath.Join(w.Dir, w.ID)
	}
	return fmt.Sprintf("/proc/self/fd/%d", w.tmp.Fd())
}

// FollowImages hashes the images as they are written and starts their writeback early (see
// follower); call ImagesWritten once the writer (CRIU) has exited. skip names files in the
// images directory that are not images and may be moved away, such as CRIU's log.
func (w *Writer) FollowImages(skip ...string) {
	w.fl = startFollower(w.images, skip...)
}

// ImagesWritten ends FollowImages: the writer has exited, every image is read to its end.
func (w *Writer) ImagesWritten() error {
	if w.fl == nil {
		return nil
	}
	sums, err := w.fl.finish()
	w.fl = nil
	if err != nil {
		return fmt.Errorf("hashing the images: %w", err)
	}
	w.sums = sums
	return nil
}

// Commit hashes and fsyncs every file, writes the manifest, renames the directory into place and
// writes the marker last. m.Files, m.Size, m.ImagesSize, m.ID, m.Format and m.Created are filled.
// The previous complete checkpoint is untouched: a crash at any point leaves either no new
// checkpoint or a complete one. What is hashed, renamed and marked is the directory Begin created:
// the rename is checked by inode before and after.
func (w *Writer) Commit(m *Manifest) error {
	if err := w.ImagesWritten(); err != nil {
		return err
	}
	if err := w.finishPack(m); err != nil {
		return err
	}
	files, err := hashTree(w.context(), w.tmp, w.sums)
	if err != nil {
		return err
	}
	m.Format = FormatVersion
	m.ID = w.ID
	m.Files = files
	m.Size, m.ImagesSize = 0, 0
	for _, f := range files {
		m.Size += f.Size
		if isImage(f.Path) {
			m.ImagesSize += f.Size
		}
	}
	if m.Pack != nil {
		for _, img := range m.Pack.Images {
			m.ImagesSize += img.Size
		}
	}
	m.Created = time.Now().UTC()
	data, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	if err := writeFileSync(w.tmp, ManifestName, data); err != nil {
		return err
	}
	if err := syncDirs(w.context(), w.tmp); err != nil {
		return err
	}
	if err := w.renameOwn(w.TmpName(), w.ID); err != nil {
		return fmt.Errorf("renaming the checkpoint into place: %w", err)
	}
	if err := w.dir.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", w.dir.Name(), err)
	}
	if err := writeFileSync(w.tmp, MarkerName, []byte(w.Key.marker(data)+"\n")); err != nil {
		return err
	}
	if err := w.tmp.Sync(); err != nil {
		return err
	}
	if w.pack != nil {
		w.pack.release() // the manifest references the chunks now: a sweep may run
	}
	return nil
}

// renameOwn renames from to to in the checkpoint directory, provided from is the directory Begin
// created, and checks that to is that directory afterwards: a pod that swaps the name for
// something else in between fails the commit. The rename never replaces an existing to.
func (w *Writer) renameOwn(from, to string) error {
	if err := w.isOwn(from); err != nil {
		return err
	}
	err := unix.Renameat2(int(w.dir.Fd()), from, int(w.dir.Fd()), to, unix.RENAME_NOREPLACE)
	if err == unix.EINVAL { // a filesystem without RENAME_NOREPLACE
		if _, serr := confine.Lstat(w.dir, to); serr == nil {
			return fmt.Errorf("%s exists already", to)
		}
		err = unix.Renameat(int(w.dir.Fd()), from, int(w.dir.Fd()), to)
	}
	if err != nil {
		return fmt.Errorf("rename %s to %s: %w", from, to, err)
	}
	return w.isOwn(to)
}

// isOwn checks that name in the checkpoint directory is the directory Begin created.
func (w *Writer) isOwn(name string) error {
	st, err := confine.Lstat(w.dir, name)
	if err != nil {
		return err
	}
	if !confine.Same(&st, &w.tmpSt) {
		return fmt.Errorf("%s in the checkpoint directory is not the directory this dump created (replaced while it was written)", name)
	}
	return nil
}

// Abort removes the temporary directory, or keeps it as .failed-<id> for diagnosis. The removal
// empties the directory through the writer's own descriptor, then removes the name only if it
// still is that directory.
func (w *Writer) Abort(keep bool) (kept string, err error) {
	if w.fl != nil {
		w.fl.abandon()
		w.fl = nil
	}
	if w.pack != nil {
		w.pack.abort()
	}
	defer w.Close()
	if keep {
		name := failedPrefix + w.ID
		if err := w.renameOwn(w.TmpName(), name); err != nil {
			return "", err
		}
		if w.Dir != "" {
			return filepath.Join(w.Dir, name), nil
		}
		return name, nil
	}
	if err := confine.RemoveContents(w.tmp); err != nil {
		return "", err
	}
	if err := w.isOwn(w.TmpName()); err != nil {
		return "", err
	}
	if err := unix.Unlinkat(int(w.dir.Fd()), w.TmpName(), unix.AT_REMOVEDIR); err != nil {
		return "", fmt.Errorf("removing %s: %w", w.TmpName(), err)
	}
	return "", nil
}

// hashTree returns the size and sha256 of every regular file below root (relative paths, sorted),
// except the manifest and the marker at the top, and fsyncs every file. Files in known were hashed
// already (by the follower): they are only fsynced, and must still have the size they were hashed
// at. Files are done in parallel. The tree is walked and opened by descriptors without following
// symlinks: anything but directories and regular files fails the checkpoint.
func hashTree(ctx context.Context, root *os.File, known map[string]FileSum) ([]FileSum, error) {
	var paths []string
	err := walkTree(root, func(rel string, st *unix.Stat_t) error {
		switch {
		case confine.IsDir(st):
			return nil
		case rel == ManifestName || rel == MarkerName:
			return nil
		case !confine.IsReg(st):
			return fmt.Errorf("%s: not a regular file (mode %#o)", rel, st.Mode&unix.S_IFMT)
		}
		paths = append(paths, rel)
		return nil
	})
	if err != nil {
		return nil, err
	}
	sort.Strings(paths)
	out := make([]FileSum, len(paths))
	// fsync is I/O-bound: more workers than CPUs let the journal commit several files at once.
	err = inParallel(len(paths), max(8, runtime.NumCPU()), func(i int) (err error) {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("hashing the checkpoint stopped: %w", err)
		}
		out[i], err = hashFile(ctx, root, paths[i], known)
		return err
	})
	if err != nil {
		return nil, err
	}
	for rel := range known {
		if _, ok := slices.BinarySearch(paths, rel); !ok {
			return nil, fmt.Errorf("%s: hashed while written, now missing", rel)
		}
	}
	return out, nil
}

// walkTree calls fn for every entry below root (not root itself) with its path relative to root,
// parents before children. Directories are entered by descriptor, never through a symlink or a
// mount point.
func walkTree(root *os.File, fn func(rel string, st *unix.Stat_t) error) error {
	return walkDirAt(root, "", func(_ *os.File, _, rel string, st *unix.Stat_t) error { return fn(rel, st) })
}

// walkDirAt is walkTree giving fn the entry's directory (open) and name too, for *at calls.
func walkDirAt(d *os.File, rel string, fn func(d *os.File, name, rel string, st *unix.Stat_t) error) error {
	des, err := confine.ReadDir(d)
	if err != nil {
		return err
	}
	for _, de := range des {
		p := path.Join(rel, de.Name)
		if err := fn(d, de.Name, p, &de.Stat_t); err != nil {
			return err
		}
		if !de.IsDir() {
			continue
		}
		sub, err := confine.OpenBeneath(d, de.Name, unix.O_RDONLY|unix.O_DIRECTORY)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		err = walkDirAt(sub, p, fn)
		sub.Close()
		if err != nil {
			return err
		}
	}
	return nil
}

// inParallel runs fn(0..n-1) on workers goroutines and joins their errors.
func inParallel(n, workers int, fn func(i int) error) error {
	errs := make([]error, n)
	work := make(chan int)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				errs[i] = fn(i)
			}
		}()
	}
	for i := range n {
		work <- i
	}
	close(work)
	wg.Wait()
	return errors.Join(errs...)
}

// openRegular opens rel below root for reading: no symlink on the way, a regular file only
// (O_NONBLOCK: a FIFO swapped in must not block the open).
func openRegular(root *os.File, rel string) (*os.File, unix.Stat_t, error) {
	f, err := confine.OpenBeneath(root, rel, unix.O_RDONLY|unix.O_NONBLOCK)
	if err != nil {
		return nil, unix.Stat_t{}, err
	}
	st, err := confine.Stat(f)
	if err == nil && !confine.IsReg(&st) {
		err = fmt.Errorf("%s: not a regular file", rel)
	}
	if err != nil {
		f.Close()
		return nil, st, err
	}
	return f, st, nil
}

func hashFile(ctx context.Context, root *os.File, rel string, known map[string]FileSum) (FileSum, error) {
	f, st, err := openRegular(root, rel)
	if err != nil {
		return FileSum{}, err
	}
	defer f.Close()
	if sum, ok := known[rel]; ok {
		if st.Size != sum.Size {
			return FileSum{}, fmt.Errorf("%s: %d bytes, %d when hashed", rel, st.Size, sum.Size)
		}
		if err := f.Sync(); err != nil {
			return FileSum{}, fmt.Errorf("fsync %s: %w", rel, err)
		}
		return sum, nil
	}
	h := sha256.New()
	n, err := io.CopyBuffer(h, ctxReader{ctx, f}, make([]byte, 1<<20))
	if err != nil {
		return FileSum{}, fmt.Errorf("reading %s: %w", rel, err)
	}
	if err := f.Sync(); err != nil {
		return FileSum{}, fmt.Errorf("fsync %s: %w", rel, err)
	}
	return FileSum{Path: rel, Size: n, SHA256: hex.EncodeToString(h.Sum(nil))}, nil
}

// writeFileSync writes name in dir anew (an existing entry is removed, never written through)
// and fsyncs it.
func writeFileSync(dir *os.File, name string, data []byte) error {
	if err := unix.Unlinkat(int(dir.Fd()), name, 0); err != nil && err != unix.ENOENT {
		return fmt.Errorf("replacing %s: %w", name, err)
	}
	f, err := confine.CreateEntry(dir, name, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// syncDirs fsyncs root and every directory below it (bottom-up order does not matter for fsync).
func syncDirs(ctx context.Context, root *os.File) error {
	if err := root.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", root.Name(), err)
	}
	return walkTree(root, func(rel string, st *unix.Stat_t) error {
		if !confine.IsDir(st) {
			return nil
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("syncing the checkpoint stopped: %w", err)
		}
		d, err := confine.OpenBeneath(root, rel, unix.O_RDONLY|unix.O_DIRECTORY)
		if err != nil {
			return err
		}
		defer d.Close()
		if err := d.Sync(); err != nil {
			return fmt.Errorf("fsync %s: %w", rel, err)
		}
		return nil
	})
}
