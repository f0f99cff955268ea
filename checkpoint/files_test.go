package checkpoint

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/internal/confine"
)

func newWriter(t *testing.T) (*Writer, string) {
	t.Helper()
	dir := t.TempDir()
	w, err := BeginAt(openRoot(t, dir), NewID(time.Now()))
	require.NoError(t, err)
	t.Cleanup(func() { w.Close() })
	return w, filepath.Join(dir, w.TmpName())
}

// Symlinks inside a copied tree are copied as symlinks (their target string kept), never
// followed, whatever they point to.
func TestCopyInKeepsSymlinks(t *testing.T) {
	host := fakeHost(t)
	root := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(root, "data", "sub"), 0o750))
	require.NoError(t, os.WriteFile(filepath.Join(root, "data", "sub", "f"), []byte("ctr"), 0o640))
	require.NoError(t, os.Symlink(host+"/secret", filepath.Join(root, "data", "abs")))
	require.NoError(t, os.Symlink("../../../../../"+host, filepath.Join(root, "data", "up")))
	w, tmp := newWriter(t)
	copied, err := w.CopyIn(openRoot(t, root), []string{"/data"}, DefaultCopyLimits)
	require.NoError(t, err)
	assert.Equal(t, []CopiedFile{{Path: "/data", Stored: "files/data"}}, copied)
	got, err := os.Readlink(filepath.Join(tmp, "files", "data", "abs"))
	require.NoError(t, err)
	assert.Equal(t, host+"/secret", got)
	got, err = os.Readlink(filepath.Join(tmp, "files", "data", "up"))
	require.NoError(t, err)
	assert.Equal(t, "../../../../../"+host, got)
	b, err := os.ReadFile(filepath.Join(tmp, "files", "data", "sub", "f"))
	require.NoError(t, err)
	assert.Equal(t, "ctr", string(b))
	fi, err := os.Stat(filepath.Join(tmp, "files", "data", "sub"))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o750), fi.Mode().Perm(), "the mode is kept")
	noMarkerIn(t, tmp)
}

// The copied tree is capped in bytes and in entries; the error names the path and the cap.
func TestCopyInLimits(t *testing.T) {
	root := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(root, "big"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(root, "big", "a"), make([]byte, 600), 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(root, "big", "b"), make([]byte, 600), 0o600))
	for i := range 20 {
		require.NoError(t, os.MkdirAll(filepath.Join(root, "many", string(rune('a'+i))), 0o755))
	}
	tests := []struct {
		path    string
		lim     CopyLimits
		wantErr string
	}{
		{"/big", CopyLimits{Bytes: 1000}, "/big: more than 1000 bytes"},
		{"/big", CopyLimits{Bytes: 1200, Entries: 3}, ""},
		{"/big/a", CopyLimits{Bytes: 599}, "/big/a: more than 599 bytes"},
		{"/many", CopyLimits{Entries: 10}, "/many: more than 10 files, directories and symlinks"},
		{"/many", CopyLimits{Entries: 21}, ""},
		{"/big", CopyLimits{}, ""}, // zero: no cap
	}
	for _, tt := range tests {
		t.Run(tt.path+"/"+tt.wantErr, func(t *testing.T) {
			w, _ := newWriter(t)
			_, err := w.CopyIn(openRoot(t, root), []string{tt.path}, tt.lim)
			if tt.wantErr == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorContains(t, err, tt.wantErr)
			assert.Contains(t, err.Error(), "cap on checkpoint files")
		})
	}
	assert.Equal(t, CopyLimits{Bytes: 1 << 30, Entries: 100_000}, DefaultCopyLimits)
}

// Paths under the kernel's trees are refused by name, and a symlink into a procfs (here the real
// one: the root is "/") is refused by the filesystem it lands on.
func TestCopyInRefusesKernelTrees(t *testing.T) {
	w, _ := newWriter(t)
	for _, p := range []string{"/proc/self/environ", "/sys/kernel", "/dev/mem", "/stasis/tools", "/", "relative"} {
		_, err := w.CopyIn(openRoot(t, "/"), []string{p}, DefaultCopyLimits)
		assert.Error(t, err, p)
	}
	dir := t.TempDir()
	require.NoError(t, os.Symlink("/proc/self/status", filepath.Join(dir, "status")))
	require.NoError(t, os.Symlink("/sys/kernel", filepath.Join(dir, "kernel")))
	for _, n := range []string{"status", "kernel"} {
		_, err := w.CopyIn(openRoot(t, "/"), []string{filepath.Join(dir, n)}, DefaultCopyLimits)
		assert.ErrorContains(t, err, "filesystem, refused", n)
	}
}

// Every CopiedFile of a manifest is validated before PutBack removes or writes anything.
func TestPutBackValidatesManifestPaths(t *testing.T) {
	tests := []struct {
		name string
		c    CopiedFile
		err  string
	}{
		{"relative path", CopiedFile{Path: "etc/keep", Stored: "files/etc/keep"}, "not an absolute path"},
		{"dotdot path", CopiedFile{Path: "/data/../etc/keep", Stored: "files/etc/keep"}, "not a clean path"},
		{"root", CopiedFile{Path: "/", Stored: "files"}, "whole root"},
		{"proc", CopiedFile{Path: "/proc/1/root", Stored: "files/proc/1/root"}, "under /proc"},
		{"sys", CopiedFile{Path: "/sys", Stored: "files/sys"}, "under /sys"},
		{"dev", CopiedFile{Path: "/dev/sda", Stored: "files/dev/sda"}, "under /dev"},
		{"stasis", CopiedFile{Path: "/stasis/tools/criu", Stored: "files/stasis/tools/criu"}, "under /stasis"},
		{"stored absolute", CopiedFile{Path: "/etc/keep", Stored: "/etc/keep"}, "not inside files/"},
		{"stored escapes", CopiedFile{Path: "/etc/keep", Stored: "files/../../etc"}, "not inside files/"},
		{"stored outside files", CopiedFile{Path: "/etc/keep", Stored: "images/core-1.img"}, "not inside files/"},
		{"stored empty, not missing", CopiedFile{Path: "/etc/keep"}, "not inside files/"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			target := t.TempDir()
			require.NoError(t, os.MkdirAll(filepath.Join(target, "etc"), 0o755))
			require.NoError(t, os.WriteFile(filepath.Join(target, "etc", "keep"), []byte("keep"), 0o600))
			ckpt := t.TempDir()
			require.NoError(t, os.MkdirAll(filepath.Join(ckpt, "files", "etc"), 0o755))
			require.NoError(t, os.WriteFile(filepath.Join(ckpt, "files", "etc", "keep"), []byte("x"), 0o600))
			ok := CopiedFile{Path: "/etc/keep", Stored: "files/etc/keep"} // valid, listed first
			err := PutBack(ckpt, &Manifest{CopiedFiles: []CopiedFile{ok, tt.c}}, target)
			require.ErrorContains(t, err, tt.err)
			b, err := os.ReadFile(filepath.Join(target, "etc", "keep"))
			require.NoError(t, err)
			assert.Equal(t, "keep", string(b), "nothing removed or written before the whole manifest is valid")
		})
	}
	assert.NoError(t, CopiedFile{Path: "/data/x", Missing: true}.Validate())
}

// PutBack resolves each place inside the target root: a symlink there to the host is replaced,
// the host untouched; a symlink in the stored copy is put back as a symlink.
func TestPutBackStaysInRoot(t *testing.T) {
	host := fakeHost(t)
	before := snapshot(t, host)
	ckpt := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(ckpt, "files", "data"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(ckpt, "files", "data", "state"), []byte("42"), 0o600))
	require.NoError(t, os.Symlink(host+"/secret", filepath.Join(ckpt, "files", "data", "link")))
	target := t.TempDir()
	require.NoError(t, os.Symlink(host, filepath.Join(target, "data"))) // planted in the new pod
	require.NoError(t, os.Symlink(host, filepath.Join(target, "etc")))
	m := &Manifest{CopiedFiles: []CopiedFile{
		{Path: "/data", Stored: "files/data"},
		{Path: "/etc/deep/keep", Stored: "files/data/state"},
	}}
	err := PutBack(ckpt, m, target)
	require.ErrorContains(t, err, "/etc/deep/keep", "the place's parent resolves inside the target: absent there")
	b, err := os.ReadFile(filepath.Join(target, "data", "state"))
	require.NoError(t, err)
	assert.Equal(t, "42", string(b))
	got, err := os.Readlink(filepath.Join(target, "data", "link"))
	require.NoError(t, err)
	assert.Equal(t, host+"/secret", got)
	assert.Equal(t, before, snapshot(t, host))
}

// CRIU gets the images directory as the writer's descriptor: a pod that moves the directory away
// and puts another in its place does not change where CRIU writes.
func TestImagesDescriptorIsTheWritersDirectory(t *testing.T) {
	root := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(root, "ckpt"), 0o700))
	r := openRoot(t, root)
	d, err := confine.MkdirAll(r, "/ckpt", 0o700)
	require.NoError(t, err)
	defer d.Close()
	w, err := BeginAt(d, NewID(time.Now()))
	require.NoError(t, err)

	tmp := filepath.Join(root, "ckpt", w.TmpName())
	require.NoError(t, os.Rename(tmp, tmp+".moved"))
	require.NoError(t, os.MkdirAll(filepath.Join(tmp, "images"), 0o700))
	require.NoError(t, os.WriteFile(fmt.Sprintf("/proc/self/fd/%d/pages-1.img", w.Images().Fd()), []byte("x"), 0o600))
	_, err = os.Stat(filepath.Join(tmp+".moved", "images", "pages-1.img"))
	require.NoError(t, err, "written through the descriptor: lands in the writer's directory")
	_, err = os.Stat(filepath.Join(tmp, "images", "pages-1.img"))
	assert.True(t, os.IsNotExist(err), "never in the directory swapped in")
	require.NoError(t, os.Remove(filepath.Join(tmp+".moved", "images", "pages-1.img")))
	require.NoError(t, os.RemoveAll(tmp))
	require.NoError(t, os.Rename(tmp+".moved", tmp))

	// CRIU's log is read and moved without following a symlink planted in its place.
	require.NoError(t, os.Symlink("/etc/hostname", filepath.Join(tmp, "images", DumpLogName)))
	_, err = w.OpenFile("images/" + DumpLogName)
	assert.Error(t, err)
	require.NoError(t, os.Remove(filepath.Join(tmp, "images", DumpLogName)))
	require.NoError(t, os.WriteFile(filepath.Join(tmp, "images", DumpLogName), []byte("log"), 0o600))
	f, err := w.OpenFile("images/" + DumpLogName)
	require.NoError(t, err)
	f.Close()
	require.NoError(t, w.KeepLog())
	require.NoError(t, w.WriteFile("images/core-1.img", []byte("core")))
	assert.Equal(t, int64(7), w.Written())

	require.NoError(t, w.Commit(&Manifest{Container: "app"}))
	assert.NoFileExists(t, filepath.Join(root, "ckpt", w.TmpName()+".images"), "the link is gone")
	m, err := Verify(filepath.Join(root, "ckpt", w.ID))
	require.NoError(t, err)
	assert.Len(t, m.Files, 2)
}

// Chown gives the checkpoint directory and tree to the app's user, symlinks themselves (never
// what they point to).
func TestChown(t *testing.T) {
	host := fakeHost(t)
	before := snapshot(t, host)
	dir := t.TempDir()
	w, err := BeginAt(openRoot(t, dir), NewID(time.Now()))
	require.NoError(t, err)
	defer w.Close()
	require.NoError(t, w.WriteFile("images/core-1.img", []byte("core")))
	tmp := filepath.Join(dir, w.TmpName())
	require.NoError(t, os.Symlink(host+"/secret", filepath.Join(tmp, "images", "link")))
	require.NoError(t, os.Symlink(host, filepath.Join(tmp, "hostdir")))
	require.NoError(t, w.Chown(4321, 8765))
	for _, p := range []string{dir, tmp, filepath.Join(tmp, "images"), filepath.Join(tmp, "images", "core-1.img"), filepath.Join(tmp, "images", "link"), filepath.Join(tmp, "hostdir")} {
		fi, err := os.Lstat(p)
		require.NoError(t, err)
		st := fi.Sys().(*syscall.Stat_t)
		assert.Equal(t, [2]uint32{4321, 8765}, [2]uint32{st.Uid, st.Gid}, p)
	}
	assert.Equal(t, before, snapshot(t, host), "the host's files keep their owner")
}

// List and Prune leave alone a symlink named like a checkpoint (to the host), and the host.
func TestListAndPruneIgnoreSymlinks(t *testing.T) {
	host := fakeHost(t)
	require.NoError(t, os.MkdirAll(filepath.Join(host, "x"), 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(host, "x", MarkerName), nil, 0o600))
	before := snapshot(t, host)
	dir := t.TempDir()
	old := time.Now().Add(-time.Hour)
	for _, n := range []string{NewID(old), tmpPrefix + NewID(old), failedPrefix + NewID(old)} {
		require.NoError(t, os.Symlink(filepath.Join(host, "x"), filepath.Join(dir, n)))
	}
	write(t, dir, time.Now())
	l, err := List(dir)
	require.NoError(t, err)
	assert.Len(t, l, 1)
	require.NoError(t, Prune(dir, 1, time.Now()))
	des, err := os.ReadDir(dir)
	require.NoError(t, err)
	assert.Len(t, des, 4, "symlinks are not the agent's: left alone")
	assert.Equal(t, before, snapshot(t, host))
	for _, de := range des {
		assert.False(t, strings.HasPrefix(de.Name(), ".") && de.IsDir())
	}
}
