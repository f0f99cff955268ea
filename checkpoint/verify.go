package checkpoint

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"
)

// ErrIncomplete means the checkpoint has no completion marker (a dump was interrupted, or it is
// still being written).
var ErrIncomplete = errors.New("checkpoint is incomplete (no completion marker)")

// Verify checks a whole checkpoint: Check, then VerifyImages.
func Verify(ckpt string) (*Manifest, error) {
	m, err := Check(ckpt)
	if err != nil {
		return nil, err
	}
	if err := VerifyImages(ckpt, m); err != nil {
		return nil, err
	}
	return m, nil
}

// Check checks all of a checkpoint but the contents of its CRIU images: the marker exists and
// names the manifest's sha256, the manifest is of a known format and names this checkpoint, every
// file it lists exists with its size, the files outside images/ (checkpoint-files, the log) match
// their sha256, and no CRIU image is missing from the list. It returns the manifest.
//
// The images' contents are left to VerifyImages, which the launcher runs beside `criu restore`:
// the restored tree stays stopped until they are verified, so the hash of gigabytes of images
// costs the restore nothing.
func Check(ckpt string) (*Manifest, error) {
	marker, err := os.ReadFile(filepath.Join(ckpt, MarkerName))
	if os.IsNotExist(err) {
		if _, serr := os.Stat(ckpt); serr != nil {
			return nil, fmt.Errorf("checkpoint %s does not exist", ckpt)
		}
		return nil, ErrIncomplete
	}
	if err != nil {
		return nil, err
	}
	data, err := os.ReadFile(filepath.Join(ckpt, ManifestName))
	if err != nil {
		return nil, fmt.Errorf("manifest: %w", err)
	}
	sum := sha256.Sum256(data)
	if strings.TrimSpace(string(marker)) != hex.EncodeToString(sum[:]) {
		return nil, fmt.Errorf("manifest.json does not match the completion marker (corrupt manifest)")
	}
	var m Manifest
	if err := json.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("manifest.json: %w", err)
	}
	if m.Format != FormatVersion {
		return nil, fmt.Errorf("manifest.json: format %d, this stasis reads %d", m.Format, FormatVersion)
	}
	if m.ID != filepath.Base(ckpt) {
		return nil, fmt.Errorf("manifest.json: id %q does not match directory %q", m.ID, filepath.Base(ckpt))
	}
	for _, c := range m.CopiedFiles {
		if err := c.Validate(); err != nil {
			return nil, fmt.Errorf("manifest.json: %w", err)
		}
	}
	listed := map[string]bool{}
	for _, f := range m.Files {
		if !safeRel(f.Path) {
			return nil, fmt.Errorf("manifest.json: file path %q escapes the checkpoint", f.Path)
		}
		listed[f.Path] = true
		if isImage(f.Path) {
			err = checkSize(ckpt, f)
		} else {
			err = verifyFile(ckpt, f)
		}
		if err != nil {
			return nil, err
		}
	}
	// Every image on disk must be listed: an image added after the manifest is not ours.
	imgs, err := os.ReadDir(filepath.Join(ckpt, ImagesDir))
	if err != nil {
		return nil, fmt.Errorf("images: %w", err)
	}
	if len(imgs) == 0 {
		return nil, fmt.Errorf("images: no CRIU images")
	}
	for _, de := range imgs {
		if de.Name() == criuRestoreStats {
			continue
		}
		if p := ImagesDir + "/" + de.Name(); !listed[p] && de.Type().IsRegular() {
			return nil, fmt.Errorf("%s: not listed in the manifest", p)
		}
	}
	return &m, nil
}

// VerifyImages checks the sha256 of every CRIU image m lists, two files at a time.
func VerifyImages(ckpt string, m *Manifest) error {
	var imgs []FileSum
	for _, f := range m.Files {
		if isImage(f.Path) {
			imgs = append(imgs, f)
		}
	}
	return inParallel(len(imgs), 2, func(i int) error { return verifyFile(ckpt, imgs[i]) })
}

// criuRestoreStats is written into the images directory by every `criu restore` (there is no
// option against it): a checkpoint restored once, whose restored pod died before it was
// checkpointed again, must restore again.
const criuRestoreStats = "stats-restore"

func isImage(rel string) bool { return strings.HasPrefix(rel, ImagesDir+"/") }

func checkSize(ckpt string, f FileSum) error {
	fi, err := os.Stat(filepath.Join(ckpt, filepath.FromSlash(f.Path)))
	if err != nil {
		return fmt.Errorf("%s: %w", f.Path, err)
	}
	if fi.Size() != f.Size {
		return fmt.Errorf("%s: size %d, manifest says %d", f.Path, fi.Size(), f.Size)
	}
	return nil
}

func verifyFile(ckpt string, f FileSum) error {
	fh, err := os.Open(filepath.Join(ckpt, filepath.FromSlash(f.Path)))
	if err != nil {
		return fmt.Errorf("%s: %w", f.Path, err)
	}
	defer fh.Close()
	h := sha256.New()
	n, err := io.CopyBuffer(h, fh, make([]byte, 1<<20))
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
