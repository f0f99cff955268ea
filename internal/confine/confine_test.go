package confine

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// hostWithSecret makes a directory standing for the host, holding a secret the container must
// never reach.
func hostWithSecret(t *testing.T) string {
	t.Helper()
	host := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(host, "secret"), []byte("HOST-SECRET"), 0o600))
	return host
}

func readAll(t *testing.T, f *os.File) string {
	t.Helper()
	b, err := io.ReadAll(f)
	require.NoError(t, err)
	return string(b)
}

// A container root holding absolute and relative symlinks, ".." escapes, loops; each path is
// resolved as the container would see it, never onto the host.
func TestOpenResolvesInsideRoot(t *testing.T) {
	host := hostWithSecret(t)
	root := t.TempDir()
	mk := func(p, content string) {
		require.NoError(t, os.MkdirAll(filepath.Dir(filepath.Join(root, p)), 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(root, p), []byte(content), 0o600))
	}
	ln := func(target, p string) {
		require.NoError(t, os.MkdirAll(filepath.Dir(filepath.Join(root, p)), 0o755))
		require.NoError(t, os.Symlink(target, filepath.Join(root, p)))
	}
	mk("etc/secret", "container")
	mk(host+"/secret", "container copy at the host's path")
	ln("/etc/secret", "a/abs")                             // absolute: from the container's root
	ln("../etc/secret", "a/rel")                           // relative
	ln("../../../../../../../../"+host+"/secret", "a/esc") // ".." beyond the root stops at it
	ln(host, "a/hostdir")                                  // an absolute symlink to the host's path
	ln(host+"/missing", "a/dangling")                      // resolves inside: does not exist
	ln("loop2", "a/loop1")
	ln("loop1", "a/loop2")
	ln("self", "a/self")
	ln("/a", "b") // a directory symlink in the middle of a path

	tests := []struct {
		path    string
		want    string // content; "" when an error is expected
		wantErr error
	}{
		{"/etc/secret", "container", nil},
		{"etc/secret", "container", nil},
		{"/a/abs", "container", nil},
		{"/a/rel", "container", nil},
		{"/a/esc", "container copy at the host's path", nil},
		{"/a/hostdir/secret", "container copy at the host's path", nil},
		{"/b/abs", "container", nil},
		{"/../../../etc/secret", "container", nil},
		{"/a/../../../../etc/secret", "container", nil},
		{"/a/dangling", "", unix.ENOENT},
		{"/a/loop1", "", unix.ELOOP},
		{"/a/self", "", unix.ELOOP},
	}
	r, err := OpenRoot(root)
	require.NoError(t, err)
	defer r.Close()
	for _, tt := range tests {
		t.Run(tt.path, func(t *testing.T) {
			f, err := Open(r, tt.path, unix.O_RDONLY)
			if tt.wantErr != nil {
				require.ErrorIs(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			defer f.Close()
			assert.Equal(t, tt.want, readAll(t, f))
		})
	}
	// O_NOFOLLOW on the last component: the symlink itself, never its target.
	_, err = Open(r, "/a/abs", unix.O_RDONLY|unix.O_NOFOLLOW)
	assert.ErrorIs(t, err, unix.ELOOP)
	f, err := Open(r, "/a/abs", unix.O_PATH|unix.O_NOFOLLOW)
	require.NoError(t, err)
	st, err := Stat(f)
	f.Close()
	require.NoError(t, err)
	assert.True(t, IsLink(&st))
}

// Magic links (/proc/<pid>/root, /proc/<pid>/fd/<n>, /proc/self/cwd) jump anywhere in the kernel's
// tree: inside a root that has a procfs (here the real one), they are refused.
func TestOpenRefusesMagicLinks(t *testing.T) {
	host := hostWithSecret(t)
	hostDir, err := os.Open(host)
	require.NoError(t, err)
	defer hostDir.Close()
	r, err := OpenRoot("/")
	require.NoError(t, err)
	defer r.Close()
	for _, p := range []string{
		"/proc/self/root/etc/hostname",
		fmt.Sprintf("/proc/self/fd/%d/secret", hostDir.Fd()),
		"/proc/self/cwd",
		"/proc/thread-self/root",
	} {
		t.Run(p, func(t *testing.T) {
			_, err := Open(r, p, unix.O_RDONLY)
			assert.ErrorIs(t, err, unix.ELOOP)
		})
	}
	// A symlink inside the root pointing at a magic link is refused too.
	root := t.TempDir()
	require.NoError(t, os.Mkdir(filepath.Join(root, "proc"), 0o755))
	require.NoError(t, unix.Mount("proc", filepath.Join(root, "proc"), "proc", 0, ""))
	defer unix.Unmount(filepath.Join(root, "proc"), unix.MNT_DETACH)
	require.NoError(t, os.Symlink("/proc/self/root", filepath.Join(root, "escape")))
	cr, err := OpenRoot(root)
	require.NoError(t, err)
	defer cr.Close()
	_, err = Open(cr, "/escape"+host+"/secret", unix.O_RDONLY)
	assert.ErrorIs(t, err, unix.ELOOP)
	_, err = Open(cr, "/proc/self/root"+host+"/secret", unix.O_RDONLY)
	assert.ErrorIs(t, err, unix.ELOOP)
}

// OpenBeneath refuses any symlink and any ".." above the directory.
func TestOpenBeneath(t *testing.T) {
	host := hostWithSecret(t)
	dir := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "x", "y"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "x", "y", "f"), []byte("ok"), 0o600))
	require.NoError(t, os.Symlink(host, filepath.Join(dir, "x", "abs")))
	require.NoError(t, os.Symlink("y", filepath.Join(dir, "x", "rel")))
	d, err := OpenRoot(dir)
	require.NoError(t, err)
	defer d.Close()
	f, err := OpenBeneath(d, "x/y/f", unix.O_RDONLY)
	require.NoError(t, err)
	assert.Equal(t, "ok", readAll(t, f))
	f.Close()
	for p, want := range map[string]error{
		"x/abs/secret": unix.ELOOP, "x/rel/f": unix.ELOOP, "../" + filepath.Base(dir): unix.EXDEV,
		"/etc/passwd": unix.EXDEV,
	} {
		_, err := OpenBeneath(d, p, unix.O_RDONLY)
		assert.ErrorIs(t, err, want, p)
	}
}

// MkdirAll through an absolute symlink creates inside the root; the host is untouched.
func TestMkdirAllStaysInRoot(t *testing.T) {
	host := t.TempDir()
	root := t.TempDir()
	require.NoError(t, os.Symlink(host, filepath.Join(root, "ckpt")))
	r, err := OpenRoot(root)
	require.NoError(t, err)
	defer r.Close()
	// A dangling symlink (its target exists on the host only) is not created through, as mkdir -p.
	_, err = MkdirAll(r, "/ckpt/app/c1", 0o700)
	require.ErrorIs(t, err, unix.ENOENT)
	require.NoError(t, os.MkdirAll(filepath.Join(root, host), 0o755))
	require.NoError(t, os.Symlink("../../../../../../..", filepath.Join(root, "up")))
	for _, p := range []string{"/ckpt/app/c1", "/up" + host + "/app/c2"} {
		d, err := MkdirAll(r, p, 0o700)
		require.NoError(t, err, p)
		d.Close()
	}
	assert.DirExists(t, filepath.Join(root, host, "app", "c1"))
	assert.DirExists(t, filepath.Join(root, host, "app", "c2"))
	des, err := os.ReadDir(host)
	require.NoError(t, err)
	assert.Empty(t, des, "nothing created on the host")
}

// RemoveAll removes a tree holding symlinks to the host (and a mount point it must not enter)
// without touching what they point to.
func TestRemoveAllNeverFollows(t *testing.T) {
	host := hostWithSecret(t)
	dir := t.TempDir()
	tree := filepath.Join(dir, "old")
	require.NoError(t, os.MkdirAll(filepath.Join(tree, "images", "deep"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(tree, "images", "deep", "f"), nil, 0o600))
	require.NoError(t, os.Symlink(host, filepath.Join(tree, "images", "hostdir")))
	require.NoError(t, os.Symlink(host+"/secret", filepath.Join(tree, "secretlink")))
	d, err := OpenRoot(dir)
	require.NoError(t, err)
	defer d.Close()
	require.NoError(t, RemoveAll(d, "old"))
	assert.NoDirExists(t, tree)
	assert.FileExists(t, filepath.Join(host, "secret"))

	// A symlink in the place of the tree: the link goes, the host stays.
	require.NoError(t, os.Symlink(host, filepath.Join(dir, "link")))
	require.NoError(t, RemoveAll(d, "link"))
	assert.FileExists(t, filepath.Join(host, "secret"))
	assert.NoError(t, RemoveAll(d, "absent"))

	// A mount point inside the tree is not entered.
	mnt := filepath.Join(dir, "m", "mnt")
	require.NoError(t, os.MkdirAll(mnt, 0o755))
	require.NoError(t, unix.Mount(host, mnt, "", unix.MS_BIND, ""))
	defer unix.Unmount(mnt, unix.MNT_DETACH)
	err = RemoveAll(d, "m")
	assert.ErrorContains(t, err, "mount point")
	assert.FileExists(t, filepath.Join(host, "secret"))
	for _, n := range []string{"a/b", "..", ".", ""} {
		assert.Error(t, RemoveAll(d, n), n)
	}
}

// swapper flips dir/name between a real directory and a symlink to the host (absolute, and a
// ".." escape) in a tight loop until stop is closed.
func swapper(t *testing.T, parent, name, host string, stop <-chan struct{}, wg *sync.WaitGroup) *atomic.Int64 {
	t.Helper()
	p := filepath.Join(parent, name)
	real := filepath.Join(parent, "."+name+".real")
	require.NoError(t, os.Rename(p, real))
	escape := strings.Repeat("../", 16) + strings.TrimPrefix(host, "/")
	var swaps atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				_ = os.Remove(p)
				_ = os.Rename(real, p)
				return
			default:
			}
			_ = os.Rename(real, p)
			target := host
			if i%2 == 1 {
				target = escape
			}
			_ = os.Rename(p, real)
			_ = os.Symlink(target, p)
			_ = os.Remove(p)
			swaps.Add(1)
		}
	}()
	return &swaps
}

// RACE: a component flips between a directory and a symlink to the host while Open runs:
// never the host's secret.
func TestOpenRace(t *testing.T) {
	host := hostWithSecret(t)
	root := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(root, "data"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(root, "data", "secret"), []byte("container"), 0o600))
	r, err := OpenRoot(root)
	require.NoError(t, err)
	defer r.Close()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	swaps := swapper(t, root, "data", host, stop, &wg)
	var inside, leaked int
	for deadline := time.Now().Add(10 * time.Second); swaps.Load() < 1000 && time.Now().Before(deadline); {
		// Control: the same path resolved by string (what the agent did) reaches the host.
		if b, err := os.ReadFile(filepath.Join(root, "/data/secret")); err == nil && string(b) == "HOST-SECRET" {
			leaked++
		}
		f, err := Open(r, "/data/secret", unix.O_RDONLY)
		if err != nil {
			continue
		}
		got := readAll(t, f)
		f.Close()
		require.NotEqual(t, "HOST-SECRET", got)
		inside++
	}
	close(stop)
	wg.Wait()
	t.Logf("%d swaps, %d opens inside the root, %d host reads by path", swaps.Load(), inside, leaked)
	assert.Positive(t, leaked, "control: resolution by path reads the host's secret under this swapper")
	assert.Positive(t, inside, "the race is real: some opens found the container's file")
	assert.Positive(t, swaps.Load())
}

// A kernel without openat2 (here: a seccomp filter answering ENOSYS, as runtimes do for syscalls
// they do not know) gives ErrUnsupported, never a fallback to resolution by path.
func TestNoOpenat2IsErrUnsupported(t *testing.T) {
	r, err := OpenRoot(t.TempDir())
	require.NoError(t, err)
	defer r.Close()
	errc := make(chan error, 1)
	go func() {
		// The filter applies to this thread only; the goroutine ends locked, so the thread ends too.
		runtime.LockOSThread()
		filter := []unix.SockFilter{
			{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: 0}, // seccomp_data.nr
			{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jt: 0, Jf: 1, K: unix.SYS_OPENAT2},
			{Code: unix.BPF_RET | unix.BPF_K, K: unix.SECCOMP_RET_ERRNO | uint32(unix.ENOSYS)},
			{Code: unix.BPF_RET | unix.BPF_K, K: unix.SECCOMP_RET_ALLOW},
		}
		prog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			errc <- err
			return
		}
		if err := unix.Prctl(unix.PR_SET_SECCOMP, unix.SECCOMP_MODE_FILTER, uintptr(unsafe.Pointer(&prog)), 0, 0); err != nil {
			errc <- err
			return
		}
		_, err := Open(r, "/", unix.O_PATH)
		errc <- err
	}()
	err = <-errc
	require.ErrorIs(t, err, ErrUnsupported)
	assert.Contains(t, err.Error(), "openat2")
}
