package agent

import (
	"os"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/checkpoint"
	"github.com/stasis-k8s/stasis/internal/confine"
)

func writeFile(t *testing.T, p, content string) {
	t.Helper()
	require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
	require.NoError(t, os.WriteFile(p, []byte(content), 0o644))
}

// checkpoint-rootfs: the walk carries what changed since the container started in its root
// filesystem (files, symlinks, directories), never what another mount holds or what the user
// listed, and leaves the image's untouched files.
func TestRootfsChangesCarried(t *testing.T) {
	root := t.TempDir()
	writeFile(t, filepath.Join(root, "etc/image.conf"), "from the image")
	writeFile(t, filepath.Join(root, "usr/lib/libx.so"), "from the image")
	writeFile(t, filepath.Join(root, "data/keep"), "")
	time.Sleep(50 * time.Millisecond) // past the kernel's coarse clock
	since := time.Now()
	time.Sleep(50 * time.Millisecond)
	writeFile(t, filepath.Join(root, "etc/image.conf"), "modified by the app")
	writeFile(t, filepath.Join(root, "var/log/app.log"), "created by the app")
	writeFile(t, filepath.Join(root, "srv/listed/file"), "the user's checkpoint-files path")
	require.NoError(t, os.Symlink("var/log", filepath.Join(root, "current")))
	require.NoError(t, unix.Mount("tmpfs", filepath.Join(root, "data"), "tmpfs", 0, ""))
	t.Cleanup(func() { _ = unix.Unmount(filepath.Join(root, "data"), unix.MNT_DETACH) })
	writeFile(t, filepath.Join(root, "data/volume-file"), "on another mount")

	d := &dump{}
	var err error
	d.root, err = confine.OpenRoot(root)
	require.NoError(t, err)
	defer d.root.Close()
	d.w, err = checkpoint.Begin(t.TempDir(), checkpoint.NewID(time.Now()))
	require.NoError(t, err)
	defer d.w.Close()
	c := d.w.Carrier(checkpoint.DefaultCopyLimits)
	dirs := map[string]bool{}
	require.NoError(t, d.carryRootfs(c, since, []string{"/srv/listed"}, dirs))

	var carried []string
	for _, f := range c.Files {
		carried = append(carried, f.Path)
		assert.Equal(t, changedReason, f.Reason)
	}
	sort.Strings(carried)
	assert.Equal(t, []string{"/current", "/etc/image.conf", "/var/log/app.log"}, carried)
	assert.True(t, dirs["/var"] && dirs["/var/log"], "new directories are recorded: %v", dirs)
	assert.False(t, dirs["/usr/lib"], "an untouched image directory is not")
	link, err := os.Readlink(filepath.Join(d.w.Path(), "carried/current"))
	require.NoError(t, err)
	assert.Equal(t, "var/log", link, "a symlink is carried as a symlink")
}

// Deletions are read from the overlay's upper directory as the kernel marks them: a whiteout for a
// removed file, an opaque directory for a directory removed and made again.
func TestOverlayDeletedPaths(t *testing.T) {
	base := t.TempDir()
	lower, upper, work, merged := filepath.Join(base, "lower"), filepath.Join(base, "upper"), filepath.Join(base, "work"), filepath.Join(base, "merged")
	writeFile(t, filepath.Join(lower, "etc/motd"), "image")
	writeFile(t, filepath.Join(lower, "opt/app/old"), "image")
	writeFile(t, filepath.Join(lower, "keep"), "image")
	for _, d := range []string{upper, work, merged} {
		require.NoError(t, os.Mkdir(d, 0o755))
	}
	require.NoError(t, unix.Mount("overlay", merged, "overlay", 0, "lowerdir="+lower+",upperdir="+upper+",workdir="+work))
	t.Cleanup(func() { _ = unix.Unmount(merged, unix.MNT_DETACH) })
	require.NoError(t, os.Remove(filepath.Join(merged, "etc/motd")))
	require.NoError(t, os.RemoveAll(filepath.Join(merged, "opt/app")))
	require.NoError(t, os.Mkdir(filepath.Join(merged, "opt/app"), 0o755))
	writeFile(t, filepath.Join(merged, "new"), "created")

	u, err := confine.OpenRoot(upper)
	require.NoError(t, err)
	defer u.Close()
	var got []string
	require.NoError(t, deletedPaths(u, "/", 0, &got))
	sort.Strings(got)
	assert.Equal(t, []string{"/etc/motd", "/opt/app"}, got)

	mi, err := readMountinfo(os.Getpid())
	require.NoError(t, err)
	found := false
	for _, mp := range mi {
		if mp.point == merged {
			found = true
			assert.Equal(t, "overlay", mp.fstype)
			assert.Equal(t, upper, overlayUpper(mp.super), "the upper directory as mountinfo gives it")
		}
	}
	assert.True(t, found, "the overlay is in mountinfo")
}
