package checkpoint

import (
	"encoding/json"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/stasis-k8s/stasis/agentapi"
)

// chunkFiles lists the chunk files of a container's checkpoint directory ("<2 hex>/<file>").
func chunkFiles(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	root := filepath.Join(dir, chunksDir)
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			rel, _ := filepath.Rel(root, p)
			out = append(out, rel)
		}
		return nil
	})
	if os.IsNotExist(err) {
		return nil
	}
	require.NoError(t, err)
	return out
}

func TestPackZeroChunksNotStored(t *testing.T) {
	dir := t.TempDir()
	img := make([]byte, 4*DefaultChunkSize)
	copy(img[2*DefaultChunkSize:], randomHeap(100, 3)) // one chunk of four is not zero
	ckpt, err := packCheckpoint(t, dir, time.Now(), PackOptions{}, map[string][]byte{"pages-1.img": img})
	require.NoError(t, err)
	m, r := openPacked(t, ckpt)
	chunks := m.Pack.Images[0].Chunks
	require.Len(t, chunks, 4)
	for i, c := range chunks {
		require.Equal(t, i == 2, c.Name != "", "chunk %d", i)
	}
	require.Len(t, chunkFiles(t, dir), 1, "only the non-zero chunk is stored")
	got, err := readAllImage(r, "pages-1.img")
	require.NoError(t, err)
	require.Equal(t, img, got)
}

// TestPackDedupe: a second checkpoint of a 90 %-unchanged heap writes at most 0.2× the first;
// chunks it reuses stay encrypted with the first checkpoint's data key, and survive the first
// checkpoint's prune.
func TestPackDedupe(t *testing.T) {
	dir := t.TempDir()
	heap := jsonHeap(32<<20, 5)
	t0 := time.Now().Add(-time.Hour)
	first, err := packCheckpoint(t, dir, t0, PackOptions{}, map[string][]byte{"pages-1.img": heap})
	require.NoError(t, err)
	// The app changes 10 % of its heap, in a few places (what a running service does between two
	// checkpoints).
	changed := append([]byte(nil), heap...)
	for _, at := range []int{1 << 20, 9 << 20, 20 << 20, 30 << 20} {
		copy(changed[at:], jsonHeap(len(heap)/40, uint64(at)))
	}
	second, err := packCheckpoint(t, dir, t0.Add(time.Minute), PackOptions{}, map[string][]byte{"pages-1.img": changed})
	require.NoError(t, err)
	m1, _ := openPacked(t, first)
	m2, r2 := openPacked(t, second)
	t.Logf("first wrote %d bytes (%.3f of the heap), second %d (%.3f of the first)", m1.Pack.Written,
		float64(m1.Pack.Written)/float64(len(heap)), m2.Pack.Written, float64(m2.Pack.Written)/float64(m1.Pack.Written))
	require.LessOrEqual(t, float64(m2.Pack.Written), 0.2*float64(m1.Pack.Written))
	require.Len(t, m2.Pack.Keys, 2, "its own data key and the first checkpoint's")
	require.Equal(t, m1.Pack.Keys[0], m2.Pack.Keys[1])

	// Only the newest kept: the first's unshared chunks go, what the second needs stays.
	require.NoError(t, Prune(dir, 1, time.Now().Add(-2*time.Hour)))
	require.NoDirExists(t, first)
	live := map[string]bool{}
	for _, c := range m2.Pack.Images[0].Chunks {
		if c.Name != "" {
			live[m2.Pack.file(c)] = true
		}
	}
	files := chunkFiles(t, dir)
	require.Len(t, files, len(live))
	for _, f := range files {
		require.True(t, live[f], f)
	}
	got, err := readAllImage(r2, "pages-1.img")
	require.NoError(t, err)
	require.Equal(t, changed, got)
	size, err := newestSize(t, dir)
	require.NoError(t, err)
	require.GreaterOrEqual(t, size, m2.Pack.Stored)
}

func newestSize(t *testing.T, dir string) (int64, error) {
	d, err := os.Open(dir)
	require.NoError(t, err)
	defer d.Close()
	return NewestSize(d)
}

// TestPackTampering: a chunk altered, swapped with another, truncated or removed on the volume
// is an error naming the image and offset, never data.
func TestPackTampering(t *testing.T) {
	tests := []struct {
		name   string
		damage func(t *testing.T, a, b string)
		want   string
	}{
		{"flipped byte", func(t *testing.T, a, _ string) {
			data, err := os.ReadFile(a)
			require.NoError(t, err)
			data[len(data)/2] ^= 1
			require.NoError(t, os.WriteFile(a, data, 0o600))
		}, "fails authentication"},
		{"swapped with another chunk", func(t *testing.T, a, b string) {
			da, err := os.ReadFile(a)
			require.NoError(t, err)
			db, err := os.ReadFile(b)
			require.NoError(t, err)
			require.NoError(t, os.WriteFile(a, db, 0o600))
			require.NoError(t, os.WriteFile(b, da, 0o600))
		}, "fails authentication"},
		{"truncated", func(t *testing.T, a, _ string) { require.NoError(t, os.Truncate(a, 100)) }, "fails authentication"},
		{"removed", func(t *testing.T, a, _ string) { require.NoError(t, os.Remove(a)) }, "no such file"},
		{"symlink to another chunk", func(t *testing.T, a, b string) {
			require.NoError(t, os.Remove(a))
			require.NoError(t, os.Symlink(b, a))
		}, "too many levels of symbolic links"},
	}
	heap := randomHeap(1<<20, 9)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			ckpt, err := packCheckpoint(t, dir, time.Now(), PackOptions{}, map[string][]byte{"pages-1.img": heap})
			require.NoError(t, err)
			m, r := openPacked(t, ckpt)
			c1, c2 := m.Pack.Images[0].Chunks[1], m.Pack.Images[0].Chunks[2]
			tc.damage(t, filepath.Join(dir, chunksDir, m.Pack.file(c1)), filepath.Join(dir, chunksDir, m.Pack.file(c2)))
			got, err := readAllImage(r, "pages-1.img")
			require.Error(t, err)
			require.Contains(t, err.Error(), "image pages-1.img at offset 262144")
			require.Contains(t, err.Error(), tc.want)
			require.LessOrEqual(t, len(got), DefaultChunkSize, "nothing past the first (intact) chunk is returned")
			ra, _, err := r.OpenAt("pages-1.img")
			require.NoError(t, err)
			_, err = ra.ReadAt(make([]byte, 10), int64(DefaultChunkSize)+5)
			require.ErrorContains(t, err, "image pages-1.img at offset 262144")
		})
	}
}

// TestPackManifestBindsChunks: the signed manifest is what ties chunks to a checkpoint; a
// manifest edited to reference other chunks is not authentic.
func TestPackManifestBindsChunks(t *testing.T) {
	dir := t.TempDir()
	ckpt, err := packCheckpoint(t, dir, time.Now(), PackOptions{}, map[string][]byte{"pages-1.img": randomHeap(1<<20, 4)})
	require.NoError(t, err)
	m, err := ReadManifest(ckpt)
	require.NoError(t, err)
	c := m.Pack.Images[0].Chunks
	c[0], c[1] = c[1], c[0]
	data, err := json.MarshalIndent(m, "", "  ")
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(ckpt, ManifestName), data, 0o600))
	d, err := os.Open(ckpt)
	require.NoError(t, err)
	defer d.Close()
	_, err = CheckAt(d, filepath.Base(ckpt), testRingKey)
	require.ErrorIs(t, err, ErrNotAuthentic)
}

func TestPackFormat1Refused(t *testing.T) {
	dir := t.TempDir()
	ckpt, err := packCheckpoint(t, dir, time.Now(), PackOptions{}, map[string][]byte{"pages-1.img": []byte("x")})
	require.NoError(t, err)
	m, err := ReadManifest(ckpt)
	require.NoError(t, err)
	m.Format = 1
	data, err := json.MarshalIndent(m, "", "  ")
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(ckpt, ManifestName), data, 0o600))
	require.NoError(t, os.WriteFile(filepath.Join(ckpt, MarkerName), []byte(testRingKey.marker(data)), 0o600))
	d, err := os.Open(ckpt)
	require.NoError(t, err)
	defer d.Close()
	_, err = CheckAt(d, filepath.Base(ckpt), testRingKey)
	require.ErrorIs(t, err, ErrFormat)
	require.ErrorContains(t, err, "format 1")
}

// TestPackKeys: a checkpoint opens only with this cluster's key and for the namespace its data
// key was wrapped for; the subkeys differ from the manifest key and from each other.
func TestPackKeys(t *testing.T) {
	dir := t.TempDir()
	ckpt, err := packCheckpoint(t, dir, time.Now(), PackOptions{}, map[string][]byte{"pages-1.img": randomHeap(1<<20, 4)})
	require.NoError(t, err)
	m, err := ReadManifest(ckpt)
	require.NoError(t, err)
	parent, err := os.Open(dir)
	require.NoError(t, err)
	defer parent.Close()
	other, err := NewKeyRing(Key("another cluster's key, 32 bytes and more"), nil)
	require.NoError(t, err)
	_, err = OpenPack(parent, m, other)
	require.ErrorContains(t, err, "cannot be unwrapped")
	m.Pod.Namespace = "ns2"
	_, err = OpenPack(parent, m, testRing(t))
	require.ErrorContains(t, err, "cannot be unwrapped")

	ring := testRing(t)
	_, k1, _ := ring.keks.Current("ns1")
	_, k2, _ := ring.keks.Current("ns2")
	require.NotEqual(t, k1, k2)
	require.NotEqual(t, []byte(ring.manifest), ring.naming)
	require.NotEqual(t, k1, ring.naming)
	// The chunk name is keyed: not the sha256 of the plaintext, and another key names it otherwise.
	require.NotEqual(t, chunkName(ring.naming, []byte("x")), chunkName(other.naming, []byte("x")))
}

// TestPackENOSPC: a dump that fills the volume fails with ENOSPC, leaves none of its chunks nor
// its directory, and the previous checkpoint restores intact.
func TestPackENOSPC(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", dir).Run() })
	cdir := filepath.Join(dir, "ckpts")
	heap := randomHeap(2<<20, 1)
	first, err := packCheckpoint(t, cdir, time.Now().Add(-time.Minute), PackOptions{}, map[string][]byte{"pages-1.img": heap})
	require.NoError(t, err)
	before := chunkFiles(t, cdir)

	_, err = packCheckpoint(t, cdir, time.Now(), PackOptions{}, map[string][]byte{"pages-1.img": randomHeap(16<<20, 2)})
	require.ErrorIs(t, err, syscall.ENOSPC)
	require.ErrorContains(t, err, "image pages-1.img at offset")
	require.ElementsMatch(t, before, chunkFiles(t, cdir), "the failed dump's chunks are removed")
	entries, err := os.ReadDir(cdir)
	require.NoError(t, err)
	for _, e := range entries {
		require.False(t, strings.HasPrefix(e.Name(), tmpPrefix), "left %s", e.Name())
	}
	_, r := openPacked(t, first)
	got, err := readAllImage(r, "pages-1.img")
	require.NoError(t, err)
	require.Equal(t, heap, got)
}

// TestPackSweepWaitsForDump: a prune while a dump is writing leaves its chunks (and the ones it
// reuses) alone; the next prune, after its commit, sweeps what no checkpoint references.
func TestPackSweepWaitsForDump(t *testing.T) {
	dir := t.TempDir()
	t0 := time.Now().Add(-time.Hour)
	old, err := packCheckpoint(t, dir, t0, PackOptions{}, map[string][]byte{"pages-1.img": randomHeap(1<<20, 1)})
	require.NoError(t, err)
	_, err = packCheckpoint(t, dir, t0.Add(time.Minute), PackOptions{}, map[string][]byte{"pages-1.img": randomHeap(1<<20, 2)})
	require.NoError(t, err)

	w, err := Begin(dir, NewID(t0.Add(2*time.Minute)))
	require.NoError(t, err)
	w.Key = testRingKey
	sink, err := w.Pack(testRing(t), "ns1", PackOptions{})
	require.NoError(t, err)
	heap := randomHeap(1<<20, 3)
	require.NoError(t, writeImage(sink, "pages-1.img", heap))
	// A prune now (keep 1: the second checkpoint) must not take the dump's chunks.
	require.NoError(t, Prune(dir, 1, t0.Add(-time.Hour)))
	require.NoDirExists(t, old)
	require.Len(t, chunkFiles(t, dir), 12, "the first checkpoint's 4 chunks (swept only after the dump), the second's 4 and the dump's 4")
	require.NoError(t, w.Commit(&Manifest{Container: "app", Pod: agentapi.PodRef{Namespace: "ns1"}}))
	require.NoError(t, w.Close())
	require.NoError(t, Prune(dir, 1, t0.Add(-time.Hour)))
	require.Len(t, chunkFiles(t, dir), 4)
	_, r := openPacked(t, w.Final())
	got, err := readAllImage(r, "pages-1.img")
	require.NoError(t, err)
	require.Equal(t, heap, got)
}
