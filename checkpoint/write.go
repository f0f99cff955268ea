package checkpoint

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"sync"
	"time"
)

// Writer builds one checkpoint in a temporary directory; Commit makes it complete, Abort drops it.
type Writer struct {
	Dir string // the container's checkpoint directory
	ID  string
	tmp string

	fl     *follower          // hashing the images while CRIU writes them (FollowImages)
	images map[string]FileSum // what the follower hashed, once the writer exited
}

// Begin creates <dir>/.tmp-<id>/images. Checkpoints hold process memory (secrets): 0700.
func Begin(dir, id string) (*Writer, error) {
	if !ValidID(id) {
		return nil, fmt.Errorf("checkpoint id %q is not a valid directory name", id)
	}
	w := &Writer{Dir: dir, ID: id, tmp: filepath.Join(dir, tmpPrefix+id)}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating checkpoint directory: %w", err)
	}
	if err := os.MkdirAll(filepath.Join(w.tmp, ImagesDir), 0o700); err != nil {
		return nil, fmt.Errorf("creating checkpoint directory: %w", err)
	}
	return w, nil
}

// Path is the temporary directory being written.
func (w *Writer) Path() string { return w.tmp }

// TmpName is Path relative to Dir (to build the same path as seen in a container).
func (w *Writer) TmpName() string { return tmpPrefix + w.ID }

// Final is where the checkpoint lives once committed.
func (w *Writer) Final() string { return filepath.Join(w.Dir, w.ID) }

// FollowImages hashes the images as they are written and starts their writeback early (see
// follower); call ImagesWritten once the writer (CRIU) has exited. skip names files in the
// images directory that are not images and may be moved away, such as CRIU's log.
func (w *Writer) FollowImages(skip ...string) {
	w.fl = startFollower(filepath.Join(w.tmp, ImagesDir), skip...)
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
	w.images = sums
	return nil
}

// Commit hashes and fsyncs every file, writes the manifest, renames the directory into place and
// writes the marker last. m.Files, m.Size, m.ImagesSize, m.ID, m.Format and m.Created are filled.
// The previous complete checkpoint is untouched: a crash at any point leaves either no new
// checkpoint or a complete one.
func (w *Writer) Commit(m *Manifest) error {
	if err := w.ImagesWritten(); err != nil {
		return err
	}
	files, err := hashTree(w.tmp, w.images)
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
	m.Created = time.Now().UTC()
	data, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	if err := writeFileSync(filepath.Join(w.tmp, ManifestName), data); err != nil {
		return err
	}
	if err := syncDirs(w.tmp); err != nil {
		return err
	}
	if err := os.Rename(w.tmp, w.Final()); err != nil {
		return fmt.Errorf("renaming the checkpoint into place: %w", err)
	}
	if err := syncDir(w.Dir); err != nil {
		return err
	}
	sum := sha256.Sum256(data)
	if err := writeFileSync(filepath.Join(w.Final(), MarkerName), []byte(hex.EncodeToString(sum[:])+"\n")); err != nil {
		return err
	}
	return syncDir(w.Final())
}

// Abort removes the temporary directory, or keeps it as .failed-<id> for diagnosis.
func (w *Writer) Abort(keep bool) (kept string, err error) {
	if w.fl != nil {
		w.fl.abandon()
		w.fl = nil
	}
	if keep {
		kept = filepath.Join(w.Dir, failedPrefix+w.ID)
		return kept, os.Rename(w.tmp, kept)
	}
	return "", os.RemoveAll(w.tmp)
}

// hashTree returns the size and sha256 of every regular file below root (relative paths, sorted),
// except the manifest and the marker at the top, and fsyncs every file. Files in known were hashed
// already (by the follower): they are only fsynced, and must still have the size they were hashed
// at. Files are done in parallel.
func hashTree(root string, known map[string]FileSum) ([]FileSum, error) {
	var paths []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if d.IsDir() {
			return nil
		}
		if rel == ManifestName || rel == MarkerName {
			return nil
		}
		if !d.Type().IsRegular() {
			return fmt.Errorf("%s: not a regular file (%s)", rel, d.Type())
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
		out[i], err = hashFile(root, paths[i], known)
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

func hashFile(root, rel string, known map[string]FileSum) (FileSum, error) {
	f, err := os.Open(filepath.Join(root, rel))
	if err != nil {
		return FileSum{}, err
	}
	defer f.Close()
	if sum, ok := known[filepath.ToSlash(rel)]; ok {
		fi, err := f.Stat()
		if err != nil {
			return FileSum{}, err
		}
		if fi.Size() != sum.Size {
			return FileSum{}, fmt.Errorf("%s: %d bytes, %d when hashed", rel, fi.Size(), sum.Size)
		}
		if err := f.Sync(); err != nil {
			return FileSum{}, fmt.Errorf("fsync %s: %w", rel, err)
		}
		return sum, nil
	}
	h := sha256.New()
	n, err := io.CopyBuffer(h, f, make([]byte, 1<<20))
	if err != nil {
		return FileSum{}, fmt.Errorf("reading %s: %w", rel, err)
	}
	if err := f.Sync(); err != nil {
		return FileSum{}, fmt.Errorf("fsync %s: %w", rel, err)
	}
	return FileSum{Path: filepath.ToSlash(rel), Size: n, SHA256: hex.EncodeToString(h.Sum(nil))}, nil
}

func writeFileSync(p string, data []byte) error {
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
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

func syncDir(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", p, err)
	}
	return nil
}

// syncDirs fsyncs root and every directory below it (bottom-up order does not matter for fsync).
func syncDirs(root string) error {
	return filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			return syncDir(p)
		}
		return nil
	})
}
