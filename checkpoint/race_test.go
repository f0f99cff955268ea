package checkpoint

import (
	"bytes"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/internal/confine"
)

// These tests perform the attack of issue 10: a process of the pod that is not frozen (a sidecar,
// kubectl exec) swaps a path component between a directory and a symlink to the host while the
// agent works. "The host" is a temporary directory holding a marker secret; the tests assert the
// marker never lands in a checkpoint and nothing of the host is written or removed.

const hostSecret = "HOST-SECRET-MARKER"

// fakeHost makes the directory standing for the host: a secret and a directory of files.
func fakeHost(t *testing.T) string {
	t.Helper()
	host := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(host, "secret"), []byte(hostSecret), 0o600))
	require.NoError(t, os.MkdirAll(filepath.Join(host, "etc", "deep"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(host, "etc", "deep", "keep"), []byte(hostSecret), 0o644))
	return host
}

// snapshot lists every entry below dir with its type, mode, owner and content.
func snapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	require.NoError(t, filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		require.NoError(t, err)
		fi, err := os.Lstat(p)
		require.NoError(t, err)
		st := fi.Sys().(*syscall.Stat_t)
		v := fmt.Sprintf("%s %d:%d %d", fi.Mode(), st.Uid, st.Gid, fi.ModTime().UnixNano())
		if fi.Mode().IsRegular() {
			b, err := os.ReadFile(p)
			require.NoError(t, err)
			v += " " + string(b)
		}
		out[p] = v
		return nil
	}))
	return out
}

// noMarkerIn fails if a regular file below dir holds the host's secret (symlinks are not
// followed: a symlink copied as a symlink is no leak).
func noMarkerIn(t *testing.T, dir string) (files int) {
	t.Helper()
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(p)
		require.NoError(t, err)
		require.False(t, bytes.Contains(b, []byte(hostSecret)), "the host's secret landed in %s", p)
		files++
		return nil
	})
	return files
}

// swap flips parent/name between the real directory and a symlink to the host (absolute, or a
// ".." escape) in a tight loop until stop() is called; it returns the number of swaps.
func swap(t *testing.T, parent, name, host string) (stop func() int64) {
	t.Helper()
	p := filepath.Join(parent, name)
	real := filepath.Join(parent, "."+name+".real")
	require.NoError(t, os.Rename(p, real))
	escape := strings.Repeat("../", 16) + strings.TrimPrefix(host, "/")
	done := make(chan struct{})
	var wg sync.WaitGroup
	var n atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-done:
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
			n.Add(1)
		}
	}()
	return func() int64 { close(done); wg.Wait(); return n.Load() }
}

func openRoot(t *testing.T, p string) *os.File {
	t.Helper()
	f, err := confine.OpenRoot(p)
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	return f
}

// RACE: checkpoint-files paths (a directory, a file in it, a nested directory) flip between the
// container's directory and a symlink to the host while CopyIn runs.
func TestCopyInRace(t *testing.T) {
	host := fakeHost(t)
	before := snapshot(t, host)
	root := t.TempDir()
	for _, d := range []string{"data", "tree/sub"} {
		require.NoError(t, os.MkdirAll(filepath.Join(root, d), 0o755))
	}
	require.NoError(t, os.WriteFile(filepath.Join(root, "data", "secret"), []byte("ctr"), 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(root, "tree", "sub", "secret"), []byte("ctr"), 0o600))
	r := openRoot(t, root)
	ckpts := t.TempDir()
	stop1 := swap(t, root, "data", host)
	stop2 := swap(t, filepath.Join(root, "tree"), "sub", host)
	var copied, runs int
	for deadline := time.Now().Add(20 * time.Second); runs < 300 && time.Now().Before(deadline); runs++ {
		dir := openRoot(t, ckpts)
		w, err := BeginAt(dir, NewID(time.Now()))
		require.NoError(t, err)
		_, _ = w.CopyIn(r, []string{"/data", "/data/secret", "/tree", "/tree/sub/secret", "/tree/sub"}, DefaultCopyLimits)
		noMarkerIn(t, filepath.Join(ckpts, w.TmpName()))
		if b, err := os.ReadFile(filepath.Join(ckpts, w.TmpName(), FilesDir, "data", "secret")); err == nil && string(b) == "ctr" {
			copied++
		}
		_, err = w.Abort(false)
		require.NoError(t, err)
	}
	t.Logf("%d CopyIn runs (%d copied the container's file), %d and %d swaps", runs, copied, stop1(), stop2())
	assert.Equal(t, before, snapshot(t, host), "the host is untouched")
	assert.Positive(t, copied, "some runs copied the container's files: the race ran against real copies")
}

// RACE: the checkpoint directory flips between the volume's directory and a symlink to the host
// while checkpoints are begun and committed.
func TestBeginCommitRaceOnCheckpointDir(t *testing.T) {
	host := fakeHost(t)
	before := snapshot(t, host)
	root := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(root, "ckpt", "app"), 0o755))
	r := openRoot(t, root)
	stop := swap(t, root, "ckpt", host)
	var committed, runs int
	for deadline := time.Now().Add(20 * time.Second); runs < 100 && time.Now().Before(deadline); runs++ {
		d, err := confine.MkdirAll(r, "/ckpt/app", 0o700)
		if err != nil {
			continue // the swap made it vanish for a moment
		}
		w, err := BeginAt(d, NewID(time.Now()))
		d.Close()
		require.NoError(t, err)
		require.NoError(t, w.WriteFile("images/pages-1.img", []byte("memory")))
		if err := w.Commit(&Manifest{Container: "app"}); err == nil {
			committed++
		}
		w.Close()
	}
	t.Logf("%d runs, %d committed, %d swaps", runs, committed, stop())
	assert.Equal(t, before, snapshot(t, host), "nothing written on the host")
	// Every commit is a complete checkpoint inside the root. Not all of them in ckpt/app: while
	// the swap had replaced ckpt (by a symlink, resolved inside the root, or by nothing at all),
	// the agent's MkdirAll made ckpt/app where the pod pointed it, still inside the root.
	var found int
	require.NoError(t, filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.Name() != MarkerName {
			return err
		}
		_, verr := Verify(filepath.Dir(p))
		require.NoError(t, verr, filepath.Dir(p))
		found++
		return nil
	}))
	assert.Equal(t, committed, found, "every committed checkpoint, complete, inside the root")
	assert.Positive(t, committed)
}

// RACE: a process of the pod renames the temporary directory away and puts a symlink to the host
// in its place (then puts it back) while the agent commits: the commit fails or commits the
// directory it created; the host gets no manifest, marker or rename.
func TestCommitRaceOnTmpDir(t *testing.T) {
	host := fakeHost(t)
	before := snapshot(t, host)
	dirPath := t.TempDir()
	dir := openRoot(t, dirPath)
	done := make(chan struct{})
	var wg sync.WaitGroup
	var swaps atomic.Int64
	wg.Add(1)
	go func() { // the attacker: active 5 ms out of 10, so that some commits meet it and some not
		defer wg.Done()
		for {
			select {
			case <-done:
				return
			default:
			}
			if time.Now().UnixMilli()/5%2 == 0 {
				time.Sleep(time.Millisecond)
				continue
			}
			des, _ := os.ReadDir(dirPath)
			for _, de := range des {
				n := de.Name()
				if !strings.HasPrefix(n, tmpPrefix) || !de.IsDir() {
					continue
				}
				p := filepath.Join(dirPath, n)
				if os.Rename(p, p+".stolen") == nil {
					_ = os.Symlink(host, p)
					_ = os.Remove(p)
					_ = os.Rename(p+".stolen", p)
					swaps.Add(1)
				}
			}
		}
	}()
	var committed, failed int
	kinds := map[string]int{}
	for runs := 0; runs < 150; runs++ {
		w, err := BeginAt(dir, NewID(time.Now()))
		if err != nil { // the attacker took the directory between mkdirat and open
			failed++
			continue
		}
		if err := w.WriteFile("images/pages-1.img", []byte("memory")); err != nil {
			failed++
			_, _ = w.Abort(false)
			continue
		}
		if err := w.Commit(&Manifest{Container: "app"}); err != nil {
			failed++
			kinds[errKind(err)]++
			_, _ = w.Abort(false)
			continue
		}
		committed++
		w.Close()
	}
	close(done)
	wg.Wait()
	t.Logf("%d committed, %d failed %v, %d swaps", committed, failed, kinds, swaps.Load())
	assert.Equal(t, before, snapshot(t, host), "nothing written on the host")
	des, err := os.ReadDir(dirPath)
	require.NoError(t, err)
	for _, de := range des {
		fi, err := os.Lstat(filepath.Join(dirPath, de.Name()))
		require.NoError(t, err)
		if ValidID(de.Name()) && fi.Mode()&fs.ModeSymlink != 0 {
			// Only when the swap won the rename: the commit failed then, and no marker was written.
			_, err := os.Lstat(filepath.Join(host, MarkerName))
			assert.True(t, os.IsNotExist(err))
		}
	}
	l, err := List(dirPath)
	require.NoError(t, err)
	for _, e := range l {
		_, err := Verify(e.Path)
		require.NoError(t, err, "every complete checkpoint is one the agent wrote")
	}
	assert.Positive(t, committed)
	assert.Positive(t, swaps.Load())
}

// RACE: old checkpoints (a whole directory, and the images directory inside one) flip between
// their directory and a symlink to the host while Prune removes them.
func TestPruneRace(t *testing.T) {
	host := fakeHost(t)
	before := snapshot(t, host)
	dirPath := t.TempDir()
	dir := openRoot(t, dirPath)
	old := time.Now().Add(-time.Hour)
	fake := func(id string, marker bool) {
		require.NoError(t, os.MkdirAll(filepath.Join(dirPath, id, ImagesDir), 0o700))
		require.NoError(t, os.WriteFile(filepath.Join(dirPath, id, ImagesDir, "pages-1.img"), []byte("m"), 0o600))
		if marker {
			require.NoError(t, os.WriteFile(filepath.Join(dirPath, id, MarkerName), nil, 0o600))
		}
	}
	var swaps int64
	for i := range 150 {
		a, b, c := NewID(old.Add(time.Duration(i)*time.Second)), NewID(old.Add(time.Duration(i)*time.Second+time.Millisecond)), NewID(time.Now())
		fake(a, true)
		fake(b, true)
		fake(tmpPrefix+NewID(old), false)
		fake(c, true)
		stop1 := swap(t, filepath.Join(dirPath, a), ImagesDir, host)
		stop2 := swap(t, dirPath, b, host)
		_ = PruneAt(dir, 1, time.Now().Add(-time.Minute))
		swaps += stop1() + stop2()
		des, _ := os.ReadDir(dirPath) // c, and what a lost race left
		for _, de := range des {
			require.NoError(t, confine.RemoveAll(dir, de.Name()))
		}
		require.Equal(t, before, snapshot(t, host), "round %d: the host is untouched", i)
	}
	t.Logf("%d swaps", swaps)
	// Without the attacker, Prune does remove them.
	fake(NewID(old), true)
	fake(tmpPrefix+NewID(old), false)
	keep := NewID(time.Now())
	fake(keep, true)
	require.NoError(t, PruneAt(dir, 1, time.Now().Add(-time.Minute)))
	des, err := os.ReadDir(dirPath)
	require.NoError(t, err)
	require.Len(t, des, 1)
	assert.Equal(t, keep, des[0].Name())
}

// errKind shortens an error to its kind for a test's log (paths and IDs left out).
func errKind(err error) string {
	s := err.Error()
	for _, k := range []string{"not the directory this dump created", "no such file", "too many levels", "not a directory", "exists"} {
		if strings.Contains(s, k) {
			return k
		}
	}
	return s
}
