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
	"path"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/internal/confine"
)

// ErrIncomplete means the checkpoint has no completion marker (a dump was interrupted, or it is
// still being written).
var ErrIncomplete = errors.New("checkpoint is incomplete (no completion marker)")

// ErrFormat is a checkpoint of another format than this stasis writes (an older release's): it is
// not restored, and the pod starts afresh.
var ErrFormat = errors.New("checkpoint format not supported by this release (the pod starts afresh)")

// Verify checks a whole checkpoint: Check, then VerifyImages.
func Verify(ckpt string) (*Manifest, error) {
	d, err := openCheckpoint(ckpt)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	m, err := CheckAt(d, filepath.Base(ckpt), nil)
	if err != nil {
		return nil, err
	}
	if err := VerifyImagesAt(d, m); err != nil {
		return nil, err
	}
	return m, nil
}

// Check is CheckAt for a checkpoint given by a trusted path.
func Check(ckpt string) (*Manifest, error) {
	d, err := openCheckpoint(ckpt)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	return CheckAt(d, filepath.Base(ckpt), nil)
}

// CopyImagesAt copies the CRIU images m lists from the checkpoint d into dst (a directory of the
// agent's own), checking each one's size and sha256 as it goes, two at a time. What CRIU then
// restores from dst is exactly what was verified: the checkpoint volume stays writable by the pod
// (by any pod of its namespace mounting it), which could change an image between a check and
// CRIU's read.
func CopyImagesAt(d *os.File, m *Manifest, dst *os.File) error {
	var imgs []FileSum
	for _, f := range m.Files {
		if isImage(f.Path) {
			imgs = append(imgs, f)
		}
	}
	return inParallel(len(imgs), 2, func(i int) error { return copyVerified(d, imgs[i], dst) })
}

func copyVerified(d *os.File, f FileSum, dst *os.File) error {
	out, err := confine.CreateEntry(dst, path.Base(f.Path), 0o600)
	if err != nil {
		return fmt.Errorf("%s: %w", f.Path, err)
	}
	defer out.Close()
	return readVerified(d, f, out)
}

func openCheckpoint(ckpt string) (*os.File, error) {
	d, err := os.Open(ckpt)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("checkpoint %s does not exist", ckpt)
	}
	return d, err
}

// maxManifest bounds what is read of a manifest or marker (a manifest lists a few hundred files).
const maxManifest = 16 << 20

// CheckAt checks all of checkpoint id (the directory d) but the contents of its CRIU images: the
// marker exists and names the manifest's sha256, the manifest is of a known format and names this
// checkpoint, every file it lists exists with its size, the files outside images/
// (checkpoint-files, the log) match their sha256, and no CRIU image is missing from the list. It
// returns the manifest. Every file is opened below d without following any symlink: the
// privileged agent reads checkpoints on volumes a pod writes.
//
// The images' contents are left to VerifyImagesAt, run beside the restore: the restored tree
// stays stopped until they are verified, so the hash of gigabytes of images costs the restore
// nothing.
//
// With a key, the manifest must be authenticated by it (ErrNotAuthentic otherwise): then every
// sha256 it lists is the agent's, and so are the pod, identity and image it names.
func CheckAt(d *os.File, id string, key Key) (*Manifest, error) {
	marker, err := readSmall(d, MarkerName)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, ErrIncomplete
	}
	if err != nil {
		return nil, err
	}
	data, err := readSmall(d, ManifestName)
	if err != nil {
		return nil, fmt.Errorf("manifest: %w", err)
	}
	if err := key.check(string(marker), data); err != nil {
		return nil, err
	}
	var m Manifest
	if err := json.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("manifest.json: %w", err)
	}
	if m.Format != FormatVersion {
		return nil, fmt.Errorf("manifest.json: format %d, this stasis reads %d: %w", m.Format, FormatVersion, ErrFormat)
	}
	if m.Pack != nil {
		if err := m.Pack.validate(); err != nil {
			return nil, fmt.Errorf("manifest.json: %w", err)
		}
	}
	if m.ID != id {
		return nil, fmt.Errorf("manifest.json: id %q does not match directory %q", m.ID, id)
	}
	if err := m.validatePaths(); err != nil {
		return nil, fmt.Errorf("manifest.json: %w", err)
	}
	listed := map[string]bool{}
	for _, f := range m.Files {
		if !safeRel(f.Path) {
			return nil, fmt.Errorf("manifest.json: file path %q escapes the checkpoint", f.Path)
		}
		listed[f.Path] = true
		if isImage(f.Path) {
			err = checkSize(d, f)
		} else {
			err = verifyFile(d, f)
		}
		if err != nil {
			return nil, err
		}
	}
	return &m, unlistedImages(d, listed, m.Pack != nil)
}

// unlistedImages refuses an image on disk the manifest does not list: one added after the
// manifest is not ours.
func unlistedImages(d *os.File, listed map[string]bool, packed bool) error {
	imgs, err := confine.OpenBeneath(d, ImagesDir, unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return fmt.Errorf("images: %w", err)
	}
	defer imgs.Close()
	entries, err := confine.ReadDir(imgs)
	if err != nil {
		return fmt.Errorf("images: %w", err)
	}
	if len(entries) == 0 && !packed {
		return fmt.Errorf("images: no CRIU images")
	}
	for _, e := range entries {
		if e.Name == criuRestoreStats {
			continue
		}
		if p := ImagesDir + "/" + e.Name; !listed[p] {
			return fmt.Errorf("%s: not listed in the manifest", p)
		}
	}
	return nil
}

// VerifyImagesAt checks the sha256 of every CRIU image m lists, two files at a time.
func VerifyImagesAt(d *os.File, m *Manifest) error {
	var imgs []FileSum
	for _, f := range m.Files {
		if isImage(f.Path) {
			imgs = append(imgs, f)
		}
	}
	return inParallel(len(imgs), 2, func(i int) error { return verifyFile(d, imgs[i]) })
}

// criuRestoreStats is written into the images directory by every `criu restore` (there is no
// option against it): a checkpoint restored once, whose restored pod died before it was
// checkpointed again, must restore again.
const criuRestoreStats = "stats-restore"

func isImage(rel string) bool { return strings.HasPrefix(rel, ImagesDir+"/") }

func readSmall(d *os.File, rel string) ([]byte, error) {
	f, _, err := openRegular(d, rel)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxManifest+1))
	if err == nil && len(b) > maxManifest {
		err = fmt.Errorf("%s: larger than %d bytes", rel, maxManifest)
	}
	return b, err
}

func checkSize(d *os.File, f FileSum) error {
	fh, st, err := openRegular(d, f.Path)
	if err != nil {
		return fmt.Errorf("%s: %w", f.Path, err)
	}
	fh.Close()
	if st.Size != f.Size {
		return fmt.Errorf("%s: size %d, manifest says %d", f.Path, st.Size, f.Size)
	}
	return nil
}

func verifyFile(d *os.File, f FileSum) error { return readVerified(d, f, io.Discard) }

// readVerified reads f below d into w, checking its size and sha256 against the manifest's.
func readVerified(d *os.File, f FileSum, w io.Writer) error {
	fh, _, err := openRegular(d, f.Path)
	if err != nil {
		return fmt.Errorf("%s: %w", f.Path, err)
	}
	defer fh.Close()
	h := sha256.New()
	n, err := io.CopyBuffer(io.MultiWriter(w, h), io.LimitReader(fh, f.Size+1), make([]byte, 1<<20))
	if err != nil {
		return fmt.Errorf("%s: %w", f.Path, err)
	}
	if n != f.Size {
		return fmt.Errorf("%s: size %d, manifest says %d", f.Path, n, f.Size)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != f.SHA256 {
		return fmt.Errorf("%s: sha256 %s, manifest says %s (corrupt)", f.Path, got, f.SHA256)
	}
	return nil
}

func safeRel(p string) bool {
	return p != "" && !path.IsAbs(p) && path.Clean(p) == p && p != ".." && !strings.HasPrefix(p, "../")
}
