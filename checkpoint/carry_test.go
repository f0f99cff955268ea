package checkpoint

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/internal/confine"
)

func TestCarriedValidate(t *testing.T) {
	tests := []struct {
		f   CarriedFile
		err string
	}{
		{CarriedFile{Path: "/tmp/hsperfdata_root/7", Stored: "carried/tmp/hsperfdata_root/7"}, ""},
		{CarriedFile{Path: "/dev/shm/seg", Stored: "carried/dev/shm/seg"}, ""},
		{CarriedFile{Path: "/tmp/x", Stored: "files/tmp/x"}, "is not carried/tmp/x"},
		{CarriedFile{Path: "/tmp/x", Stored: "carried/../../x"}, "is not carried/tmp/x"},
		{CarriedFile{Path: "/tmp/../etc/shadow", Stored: "carried/etc/shadow"}, "not a clean path"},
		{CarriedFile{Path: "/proc/1/root/etc/shadow", Stored: "carried/proc/1/root/etc/shadow"}, "under /proc are refused"},
		{CarriedFile{Path: "/dev/sda", Stored: "carried/dev/sda"}, "under /dev are refused"},
		{CarriedFile{Path: "tmp/x", Stored: "carried/tmp/x"}, "not an absolute path"},
	}
	for _, tt := range tests {
		err := tt.f.Validate()
		if tt.err == "" {
			assert.NoError(t, err, tt.f.Path)
		} else {
			assert.ErrorContains(t, err, tt.err, tt.f.Path)
		}
	}
	assert.ErrorContains(t, CarriedDir{Path: "/x", Mode: 0o40755}.Validate(), "is not permission bits")
}

// Carried files go back before the restore: missing directories are created with their recorded
// mode, existing ones are left alone, files replace what is there; a manifest naming a path it
// may not is refused before anything is written.
func TestPutBackCarried(t *testing.T) {
	ckpt, root := t.TempDir(), t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(ckpt, "carried/tmp/hs"), 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(ckpt, "carried/tmp/hs/7"), []byte("perf data"), 0o600))
	require.NoError(t, os.MkdirAll(filepath.Join(root, "tmp"), 0o1777))
	require.NoError(t, os.Chmod(filepath.Join(root, "tmp"), os.ModeSticky|0o777))
	require.NoError(t, os.MkdirAll(filepath.Join(root, "etc"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(root, "etc/motd"), []byte("image"), 0o644))
	m := &Manifest{
		Deleted:     []string{"/etc/motd", "/not/there"},
		Carried:     []CarriedFile{{Path: "/tmp/hs/7", Stored: "carried/tmp/hs/7"}},
		CarriedDirs: []CarriedDir{{Path: "/tmp/hs", Mode: 0o750}, {Path: "/tmp", Mode: 0o700}},
	}
	d, err := confine.OpenRoot(ckpt)
	require.NoError(t, err)
	defer d.Close()
	r, err := confine.OpenRoot(root)
	require.NoError(t, err)
	defer r.Close()
	require.NoError(t, PutBackCarriedAt(d, m, r))
	b, err := os.ReadFile(filepath.Join(root, "tmp/hs/7"))
	require.NoError(t, err)
	assert.Equal(t, "perf data", string(b))
	_, err = os.Stat(filepath.Join(root, "etc/motd"))
	assert.True(t, os.IsNotExist(err), "a path the container had deleted is deleted again")
	fi, err := os.Stat(filepath.Join(root, "tmp/hs"))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o750), fi.Mode().Perm(), "a missing directory gets its recorded mode")
	fi, err = os.Stat(filepath.Join(root, "tmp"))
	require.NoError(t, err)
	assert.Equal(t, os.ModeSticky|0o777, fi.Mode()&(os.ModeSticky|os.ModePerm), "an existing directory is left as the image has it")

	for _, bad := range []*Manifest{{Deleted: []string{"/proc/1"}}, {Deleted: []string{"/etc/../.."}}} {
		assert.Error(t, PutBackCarriedAt(d, bad, r), bad.Deleted)
	}
	bad := &Manifest{
		Carried:     []CarriedFile{{Path: "/tmp/hs/8", Stored: "carried/tmp/hs/8"}},
		CarriedDirs: []CarriedDir{{Path: "/sys/x", Mode: 0o700}},
	}
	require.ErrorContains(t, PutBackCarriedAt(d, bad, r), "under /sys are refused")
	_, err = os.Stat(filepath.Join(root, "tmp/hs/8"))
	assert.True(t, os.IsNotExist(err), "nothing written for a manifest with a bad path")
}

// A checkpoint whose deadline has passed is not finished: copying, hashing and syncing stop, and
// nothing complete is left.
func TestWriterWithinDeadline(t *testing.T) {
	dir := t.TempDir()
	w, err := Begin(dir, NewID(time.Now()))
	require.NoError(t, err)
	defer w.Close()
	require.NoError(t, os.WriteFile(filepath.Join(w.Path(), ImagesDir, "pages-1.img"), make([]byte, 4<<20), 0o600))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	w.Within(ctx)
	src := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(src, "f"), []byte("data"), 0o644))
	_, err = CopyIn(src, []string{"/f"}, t.TempDir()) // the trusted-path helper has no deadline
	require.NoError(t, err)
	r, err := confine.OpenRoot(src)
	require.NoError(t, err)
	defer r.Close()
	_, err = w.CopyIn(r, []string{"/f"}, DefaultCopyLimits)
	assert.ErrorIs(t, err, context.Canceled, "copying stops")
	assert.ErrorIs(t, w.Commit(&Manifest{}), context.Canceled, "hashing stops")
	entries, err := List(dir)
	require.NoError(t, err)
	assert.Empty(t, entries, "nothing complete")
}
