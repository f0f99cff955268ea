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

// Verify checks a checkpoint directory: the marker exists and names the manifest's sha256, the
// manifest is of a known format and names this checkpoint, and every file it lists exists with its
// size and sha256, with no CRIU image missing from the list. It returns the manifest.
func Verify(ckpt string) (*Manifest, error) {
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
	listed := map[string]bool{}
	for _, f := range m.Files {
		if !safeRel(f.Path) {
			return nil, fmt.Errorf("manifest.json: file path %q escapes the checkpoint", f.Path)
		}
		listed[f.Path] = true
		if err := verifyFile(ckpt, f); err != nil {
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
		if p := ImagesDir + "/" + de.Name(); !listed[p] && de.Type().IsRegular() {
			return nil, fmt.Errorf("%s: not listed in the manifest", p)
		}
	}
	return &m, nil
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

// StoredPath is where a checkpoint-files path is kept inside a checkpoint.
func StoredPath(abs string) string {
	return path.Join(FilesDir, strings.TrimPrefix(path.Clean("/"+abs), "/"))
}
