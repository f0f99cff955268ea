package checkpoint

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// write makes a complete checkpoint with two images and a copied file.
func write(t *testing.T, dir string, at time.Time) string {
	t.Helper()
	w, err := Begin(dir, NewID(at))
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(w.Path(), ImagesDir, "pages-1.img"), []byte("memory"), 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(w.Path(), ImagesDir, "core-1.img"), []byte("core"), 0o600))
	require.NoError(t, os.MkdirAll(filepath.Join(w.Path(), FilesDir, "data"), 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(w.Path(), FilesDir, "data", "state"), []byte("42"), 0o600))
	require.NoError(t, w.Commit(&Manifest{Container: "app"}))
	return w.Final()
}

func TestVerify(t *testing.T) {
	tests := []struct {
		name    string
		damage  func(t *testing.T, ckpt string)
		wantErr string
		// checkPasses: the damage is in an image's content, which Check leaves to VerifyImages.
		checkPasses bool
	}{
		{"complete", func(*testing.T, string) {}, "", false},
		{"no marker: partial", func(t *testing.T, c string) { require.NoError(t, os.Remove(filepath.Join(c, MarkerName))) }, "incomplete", false},
		{"flipped image byte", func(t *testing.T, c string) {
			require.NoError(t, os.WriteFile(filepath.Join(c, ImagesDir, "pages-1.img"), []byte("memorx"), 0o600))
		}, "pages-1.img: sha256", true},
		{"flipped copied file byte", func(t *testing.T, c string) {
			require.NoError(t, os.WriteFile(filepath.Join(c, FilesDir, "data", "state"), []byte("43"), 0o600))
		}, "files/data/state: sha256", false},
		{"truncated image", func(t *testing.T, c string) {
			require.NoError(t, os.WriteFile(filepath.Join(c, ImagesDir, "pages-1.img"), []byte("mem"), 0o600))
		}, "size 3", false},
		{"missing copied file", func(t *testing.T, c string) {
			require.NoError(t, os.Remove(filepath.Join(c, FilesDir, "data", "state")))
		}, "files/data/state", false},
		{"restored once: CRIU's stats-restore beside the images", func(t *testing.T, c string) {
			require.NoError(t, os.WriteFile(filepath.Join(c, ImagesDir, "stats-restore"), []byte("stats"), 0o600))
		}, "", false},
		{"extra image", func(t *testing.T, c string) {
			require.NoError(t, os.WriteFile(filepath.Join(c, ImagesDir, "mm-1.img"), []byte("x"), 0o600))
		}, "not listed", false},
		{"edited manifest", func(t *testing.T, c string) {
			b, err := os.ReadFile(filepath.Join(c, ManifestName))
			require.NoError(t, err)
			require.NoError(t, os.WriteFile(filepath.Join(c, ManifestName), append(b, ' '), 0o600))
		}, "does not match the completion marker", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := write(t, t.TempDir(), time.Now())
			tt.damage(t, c)
			checked, checkErr := Check(c)
			if tt.wantErr == "" || tt.checkPasses {
				require.NoError(t, checkErr)
				assert.Equal(t, "app", checked.Container)
			} else {
				assert.ErrorContains(t, checkErr, tt.wantErr)
			}
			m, err := Verify(c)
			if tt.wantErr == "" {
				require.NoError(t, err)
				assert.Equal(t, "app", m.Container)
				assert.Equal(t, int64(10), m.ImagesSize)
				assert.Len(t, m.Files, 3)
				return
			}
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.wantErr)
		})
	}
	_, err := Verify(filepath.Join(t.TempDir(), "nope"))
	assert.ErrorContains(t, err, "does not exist")
	assert.False(t, errors.Is(err, ErrIncomplete))
}

func TestListAndPrune(t *testing.T) {
	dir := t.TempDir()
	now := time.Now()
	a := write(t, dir, now.Add(-3*time.Minute))
	b := write(t, dir, now.Add(-2*time.Minute))
	c := write(t, dir, now.Add(-time.Minute))
	inflight, err := Begin(dir, NewID(now))
	require.NoError(t, err)
	stale, err := Begin(dir, NewID(now.Add(-time.Hour)))
	require.NoError(t, err)
	_ = stale

	l, err := List(dir)
	require.NoError(t, err)
	require.Len(t, l, 3)
	assert.Equal(t, filepath.Base(c), l[0].ID, "newest first")

	require.NoError(t, Prune(dir, 2, now.Add(-10*time.Minute)))
	l, err = List(dir)
	require.NoError(t, err)
	assert.Equal(t, []string{filepath.Base(c), filepath.Base(b)}, []string{l[0].ID, l[1].ID})
	assert.NoDirExists(t, a)
	assert.DirExists(t, inflight.Path(), "a checkpoint that may still be written is kept")
	assert.NoDirExists(t, stale.Path(), "leftovers of interrupted writes are removed")
}

func TestCopyInResolvesSymlinksInsideRoot(t *testing.T) {
	root := t.TempDir()
	host := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(host, "secret"), []byte("host"), 0o600))
	require.NoError(t, os.MkdirAll(filepath.Join(root, "data"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(root, "data", "state"), []byte("ctr"), 0o600))
	// An absolute symlink in the container must resolve inside it, never to the host's file.
	require.NoError(t, os.MkdirAll(filepath.Join(root, host), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(root, host, "secret"), []byte("container"), 0o600))
	require.NoError(t, os.Symlink(filepath.Join(host, "secret"), filepath.Join(root, "data", "link")))

	ckpt := t.TempDir()
	copied, err := CopyIn(root, []string{"/data/state", "/data/link", "/data/absent"}, ckpt)
	require.NoError(t, err)
	require.Len(t, copied, 3)
	assert.True(t, copied[2].Missing)
	b, err := os.ReadFile(filepath.Join(ckpt, "files", "data", "link"))
	require.NoError(t, err)
	assert.Equal(t, "container", string(b))

	dst := t.TempDir()
	require.NoError(t, PutBack(ckpt, &Manifest{CopiedFiles: copied}, dst))
	b, err = os.ReadFile(filepath.Join(dst, "data", "state"))
	require.NoError(t, err)
	assert.Equal(t, "ctr", string(b))
}
