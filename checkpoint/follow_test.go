package checkpoint

import (
	"bytes"
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Images hashed while they are written (appended in pieces, new files appearing, CRIU's log
// beside them) get the sums of their final content, and the checkpoint verifies.
func TestFollowImagesWhileWritten(t *testing.T) {
	w, err := Begin(t.TempDir(), NewID(time.Now()))
	require.NoError(t, err)
	w.FollowImages(DumpLogName)
	imgs := filepath.Join(w.Path(), ImagesDir)
	pages, err := os.Create(filepath.Join(imgs, "pages-1.img"))
	require.NoError(t, err)
	chunk := make([]byte, 3<<20+17) // not a multiple of anything the follower reads
	var want bytes.Buffer
	for i := range 8 {
		_, _ = rand.Read(chunk)
		_, err := pages.Write(chunk)
		require.NoError(t, err)
		want.Write(chunk)
		require.NoError(t, os.WriteFile(filepath.Join(imgs, DumpLogName), []byte("log line\n"), 0o600))
		if i == 3 {
			require.NoError(t, os.WriteFile(filepath.Join(imgs, "core-1.img"), []byte("core"), 0o600))
		}
		time.Sleep(3 * time.Millisecond)
	}
	require.NoError(t, pages.Close())
	require.NoError(t, os.WriteFile(filepath.Join(imgs, "stats-dump"), nil, 0o600)) // empty, last
	require.NoError(t, w.ImagesWritten())
	// CRIU's log is moved out of the images before the commit, as the agent does.
	require.NoError(t, os.Rename(filepath.Join(imgs, DumpLogName), filepath.Join(w.Path(), DumpLogName)))
	require.NoError(t, w.Commit(&Manifest{Container: "app"}))

	m, err := Verify(w.Final())
	require.NoError(t, err, "the sums taken while writing are those of the files")
	var paths []string
	for _, f := range m.Files {
		paths = append(paths, f.Path)
	}
	assert.Equal(t, []string{DumpLogName, "images/core-1.img", "images/pages-1.img", "images/stats-dump"}, paths)
	assert.Equal(t, int64(want.Len()), m.Files[2].Size)
}

// An image that changes behind the follower (here: truncated after it was read) fails the commit
// instead of producing a checkpoint whose manifest lies.
func TestFollowImagesRewrittenImageFails(t *testing.T) {
	w, err := Begin(t.TempDir(), NewID(time.Now()))
	require.NoError(t, err)
	w.FollowImages()
	p := filepath.Join(w.Path(), ImagesDir, "pages-1.img")
	require.NoError(t, os.WriteFile(p, bytes.Repeat([]byte("x"), 1<<20), 0o600))
	require.Eventually(t, func() bool { return w.fl.hashed.Load() == 1<<20 }, 10*time.Second, time.Millisecond)
	require.NoError(t, os.Truncate(p, 1000))
	err = w.Commit(&Manifest{Container: "app"})
	require.ErrorContains(t, err, "pages-1.img")
	_, err = w.Abort(false)
	require.NoError(t, err)
	assert.NoDirExists(t, w.Path())
}
