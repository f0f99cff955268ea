package checkpoint

import (
	"context"
	"encoding/json"
	"fmt"
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

// chunkFiles lists the files of a container's chunk store.
func chunkFiles(t *testing.T, dir string) []string {
	t.Helper()
	des, err := os.ReadDir(filepath.Join(dir, chunksDir))
	if os.IsNotExist(err) {
		return nil
	}
	require.NoError(t, err)
	var out []string
	for _, de := range des {
		out = append(out, de.Name())
	}
	return out
}

// packFiles lists the pack files m references.
func packFiles(m *Manifest) []string {
	set := map[string]bool{}
	for _, img := range m.Pack.Images {
		for _, c := range img.Chunks {
			if c.Name != "" {
				set[packFile(c.Pack)] = true
			}
		}
	}
	var out []string
	for f := range set {
		out = append(out, f)
	}
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
	require.Len(t, chunkFiles(t, dir), 1, "one pack file")
	require.Equal(t, m.Pack.Stored, m.Pack.Written)
	require.Less(t, m.Pack.Stored, int64(DefaultChunkSize), "only the non-zero chunk is stored")
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
	require.ElementsMatch(t, packFiles(m2), chunkFiles(t, dir))
	require.Greater(t, len(packFiles(m2)), len(packFiles(m1))/2)
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
	type damage func(t *testing.T, dir string, a, b ChunkRef)
	path := func(dir string, c ChunkRef) string { return filepath.Join(dir, chunksDir, packFile(c.Pack)) }
	rewrite := func(t *testing.T, dir string, c ChunkRef, f func(rec []byte) []byte) {
		data, err := os.ReadFile(path(dir, c))
		require.NoError(t, err)
		rec := append([]byte(nil), data[c.Off:c.Off+c.Stored]...)
		copy(data[c.Off:], f(rec))
		require.NoError(t, os.WriteFile(path(dir, c), data, 0o600))
	}
	record := func(t *testing.T, dir string, c ChunkRef) []byte {
		data, err := os.ReadFile(path(dir, c))
		require.NoError(t, err)
		return data[c.Off : c.Off+c.Stored]
	}
	tests := []struct {
		name   string
		damage damage
		// hit tells the chunks the damage reaches, given the one aimed at.
		hit  func(c, aimed ChunkRef) bool
		want string
	}{
		{"flipped byte", func(t *testing.T, dir string, a, _ ChunkRef) {
			rewrite(t, dir, a, func(r []byte) []byte { r[len(r)/2] ^= 1; return r })
		}, func(c, a ChunkRef) bool { return c == a }, "fails authentication"},
		{"swapped with another chunk", func(t *testing.T, dir string, a, b ChunkRef) {
			ra, rb := append([]byte(nil), record(t, dir, a)...), append([]byte(nil), record(t, dir, b)...)
			rewrite(t, dir, a, func([]byte) []byte { return rb })
			rewrite(t, dir, b, func([]byte) []byte { return ra })
		}, func(c, a ChunkRef) bool { return c == a }, "fails authentication"},
		{"truncated", func(t *testing.T, dir string, a, _ ChunkRef) {
			require.NoError(t, os.Truncate(path(dir, a), a.Off+100))
		}, func(c, a ChunkRef) bool { return c.Pack == a.Pack && c.Off >= a.Off }, "truncated"},
		{"removed", func(t *testing.T, dir string, a, _ ChunkRef) { require.NoError(t, os.Remove(path(dir, a))) },
			func(c, a ChunkRef) bool { return c.Pack == a.Pack }, "no such file"},
		{"symlink to another pack file", func(t *testing.T, dir string, a, _ ChunkRef) {
			other := filepath.Join(dir, "elsewhere")
			require.NoError(t, os.Rename(path(dir, a), other))
			require.NoError(t, os.Symlink(other, path(dir, a)))
		}, func(c, a ChunkRef) bool { return c.Pack == a.Pack }, "too many levels of symbolic links"},
	}
	heap := randomHeap(1<<20, 9)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			ckpt, err := packCheckpoint(t, dir, time.Now(), PackOptions{}, map[string][]byte{"pages-1.img": heap})
			require.NoError(t, err)
			m, r := openPacked(t, ckpt)
			chunks := m.Pack.Images[0].Chunks
			tc.damage(t, dir, chunks[1], chunks[2])
			first := 0
			for !tc.hit(chunks[first], chunks[1]) {
				first++
			}
			at := fmt.Sprintf("image pages-1.img at offset %d", first*DefaultChunkSize)
			got, err := readAllImage(r, "pages-1.img")
			require.Error(t, err)
			require.Contains(t, err.Error(), at)
			require.Contains(t, err.Error(), tc.want)
			require.Equal(t, heap[:len(got)], got)
			require.LessOrEqual(t, len(got), first*DefaultChunkSize, "nothing of a damaged chunk or past it is returned")
			ra, _, err := r.OpenAt("pages-1.img")
			require.NoError(t, err)
			_, err = ra.ReadAt(make([]byte, 10), int64(first*DefaultChunkSize)+5)
			require.ErrorContains(t, err, at)
			require.ErrorContains(t, r.Verify(context.Background()), tc.want)
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
	for _, key := range [][]byte{ring.naming, ring.naming3} {
		require.NotEqual(t, []byte(ring.manifest), key)
		require.NotEqual(t, k1, key)
	}
	require.NotEqual(t, ring.naming, ring.naming3)
	// The chunk name is keyed: another key names it otherwise, and so does the other naming.
	for _, naming := range []string{namingHMAC, NamingBLAKE3} {
		require.NotEqual(t, ring.namer(naming).name([]byte("x")), other.namer(naming).name([]byte("x")))
	}
	require.NotEqual(t, ring.namer(namingHMAC).name([]byte("x")), ring.namer(NamingBLAKE3).name([]byte("x")))
}

// TestPackHMACNamingStillRead: a pack written before BLAKE3 (chunks named by HMAC-SHA256) still
// reads back and checks; the next dump, under BLAKE3, shares none of its chunks (their names
// differ) and writes the heap anew, and the one after that dedupes against it again.
func TestPackHMACNamingStillRead(t *testing.T) {
	dir := t.TempDir()
	heap := jsonHeap(8<<20, 7)
	images := map[string][]byte{"pages-1.img": heap}
	t0 := time.Now().Add(-time.Hour)
	old, err := packCheckpoint(t, dir, t0, PackOptions{hmacNaming: true}, images)
	require.NoError(t, err)
	m0, r0 := openPacked(t, old)
	require.Equal(t, namingHMAC, m0.Pack.Naming)
	got, err := readAllImage(r0, "pages-1.img")
	require.NoError(t, err)
	require.Equal(t, heap, got)

	next, err := packCheckpoint(t, dir, t0.Add(time.Minute), PackOptions{}, images)
	require.NoError(t, err)
	m1, r1 := openPacked(t, next)
	require.Equal(t, NamingBLAKE3, m1.Pack.Naming)
	require.Equal(t, m0.Pack.Written, m1.Pack.Written, "nothing shared across namings")
	got, err = readAllImage(r1, "pages-1.img")
	require.NoError(t, err)
	require.Equal(t, heap, got)

	third, err := packCheckpoint(t, dir, t0.Add(2*time.Minute), PackOptions{}, images)
	require.NoError(t, err)
	m2, _ := openPacked(t, third)
	require.Zero(t, m2.Pack.Written)

	// A naming no reader knows is refused before any chunk is read.
	m2.Pack.Naming = "sha1"
	require.ErrorContains(t, m2.Pack.validate(), `chunk naming "sha1" unknown`)
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

	m1, err := ReadManifest(old)
	require.NoError(t, err)

	w, err := Begin(dir, NewID(t0.Add(2*time.Minute)))
	require.NoError(t, err)
	w.Key = testRingKey
	sink, err := w.Pack(testRing(t), "ns1", PackOptions{})
	require.NoError(t, err)
	heap := randomHeap(1<<20, 3)
	require.NoError(t, writeImage(sink, "pages-1.img", heap))
	// A prune now (keep 1: the second checkpoint) removes the first checkpoint, but no chunk
	// while the dump runs.
	before := chunkFiles(t, dir)
	require.NoError(t, Prune(dir, 1, t0.Add(-time.Hour)))
	require.NoDirExists(t, old)
	require.Equal(t, before, chunkFiles(t, dir))
	require.Subset(t, chunkFiles(t, dir), packFiles(m1))
	require.NoError(t, w.Commit(&Manifest{Container: "app", Pod: agentapi.PodRef{Namespace: "ns1"}}))
	require.NoError(t, w.Close())
	require.NoError(t, Prune(dir, 1, t0.Add(-time.Hour)))
	m3, r := openPacked(t, w.Final())
	require.ElementsMatch(t, packFiles(m3), chunkFiles(t, dir))
	got, err := readAllImage(r, "pages-1.img")
	require.NoError(t, err)
	require.Equal(t, heap, got)
}

// TestPackChown: the chunk store and the dump's pack files go to the app's user with the rest of
// the checkpoint.
func TestPackChown(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chown needs root")
	}
	dir := t.TempDir()
	w, err := Begin(dir, NewID(time.Now()))
	require.NoError(t, err)
	w.Key = testRingKey
	sink, err := w.Pack(testRing(t), "ns1", PackOptions{})
	require.NoError(t, err)
	require.NoError(t, writeImage(sink, "pages-1.img", randomHeap(1<<20, 1)))
	require.NoError(t, w.Commit(&Manifest{Container: "app", Pod: agentapi.PodRef{Namespace: "ns1"}}))
	require.NoError(t, w.Chown(4321, 8765))
	require.NoError(t, w.Close())
	files := chunkFiles(t, dir)
	require.NotEmpty(t, files)
	for _, p := range append([]string{""}, files...) {
		var st syscall.Stat_t
		require.NoError(t, syscall.Lstat(filepath.Join(dir, chunksDir, p), &st))
		require.EqualValues(t, 4321, st.Uid, p)
		require.EqualValues(t, 8765, st.Gid, p)
	}
}

// TestPackChunkStoreSymlinks: a pod that plants .chunks as a symlink to a host directory, or
// swaps it for one while a dump writes, never makes the agent write, read or remove anything
// there: the dump refuses the symlink, or keeps writing through the descriptor it holds, and the
// sweep does not follow it.
func TestPackChunkStoreSymlinks(t *testing.T) {
	host := t.TempDir()
	marker := filepath.Join(host, "host-file")
	require.NoError(t, os.WriteFile(marker, []byte("host"), 0o600))
	hostUnchanged := func() {
		des, err := os.ReadDir(host)
		require.NoError(t, err)
		require.Len(t, des, 1, "nothing created in the host directory")
		b, err := os.ReadFile(marker)
		require.NoError(t, err)
		require.Equal(t, "host", string(b))
	}

	// Planted before the dump.
	dir := t.TempDir()
	require.NoError(t, os.Symlink(host, filepath.Join(dir, chunksDir)))
	w, err := Begin(dir, NewID(time.Now()))
	require.NoError(t, err)
	_, err = w.Pack(testRing(t), "ns1", PackOptions{})
	require.ErrorContains(t, err, "chunk store")
	_, err = w.Abort(false)
	require.NoError(t, err)
	require.NoError(t, Prune(dir, 1, time.Now()))
	hostUnchanged()

	// Swapped while the dump writes; then pruned.
	dir = t.TempDir()
	w, err = Begin(dir, NewID(time.Now()))
	require.NoError(t, err)
	w.Key = testRingKey
	sink, err := w.Pack(testRing(t), "ns1", PackOptions{})
	require.NoError(t, err)
	wc, err := sink.Create("pages-1.img")
	require.NoError(t, err)
	_, err = wc.Write(randomHeap(1<<20, 2))
	require.NoError(t, err)
	require.NoError(t, os.Rename(filepath.Join(dir, chunksDir), filepath.Join(dir, "moved")))
	require.NoError(t, os.Symlink(host, filepath.Join(dir, chunksDir)))
	_, err = wc.Write(randomHeap(1<<20, 3))
	require.NoError(t, err)
	require.NoError(t, wc.Close())
	err = w.Commit(&Manifest{Container: "app", Pod: agentapi.PodRef{Namespace: "ns1"}})
	if err == nil {
		// The chunks went to the directory the dump opened (now "moved"); Chown does not follow.
		require.Error(t, w.Chown(4321, 4321))
	}
	require.NoError(t, w.Close())
	moved, err := os.ReadDir(filepath.Join(dir, "moved"))
	require.NoError(t, err)
	require.NotEmpty(t, moved, "the pack files are where the dump's descriptor pointed")
	require.NoError(t, Prune(dir, 1, time.Now()))
	hostUnchanged()
}

// TestPackMostlyDeadPackNotReused: a dump does not reuse chunks from a pack file the previous
// checkpoint references less than half of; it writes them again, so the old pack file goes once
// the checkpoints referencing it are pruned.
func TestPackMostlyDeadPackNotReused(t *testing.T) {
	dir := t.TempDir()
	t0 := time.Now().Add(-time.Hour)
	heap := randomHeap(8<<20, 1)
	first, err := packCheckpoint(t, dir, t0, PackOptions{}, map[string][]byte{"pages-1.img": heap})
	require.NoError(t, err)
	// The second checkpoint keeps 2 chunks of 32: it references them in the first's pack files
	// (fully live in the first checkpoint), which are now mostly dead.
	changed := append([]byte(nil), heap...)
	copy(changed[2*DefaultChunkSize:], randomHeap(len(heap)-2*DefaultChunkSize, 2))
	second, err := packCheckpoint(t, dir, t0.Add(time.Minute), PackOptions{}, map[string][]byte{"pages-1.img": changed})
	require.NoError(t, err)
	m1, err := ReadManifest(first)
	require.NoError(t, err)
	m2, err := ReadManifest(second)
	require.NoError(t, err)
	require.Len(t, m2.Pack.Keys, 2, "the second reuses the first's chunks")
	// The third, of the same heap, reuses all of the second's own pack files but none of the
	// first's: it writes those 2 chunks again.
	third, err := packCheckpoint(t, dir, t0.Add(2*time.Minute), PackOptions{}, map[string][]byte{"pages-1.img": changed})
	require.NoError(t, err)
	m3, r3 := openPacked(t, third)
	for _, f := range packFiles(m1) {
		require.NotContains(t, packFiles(m3), f)
	}
	require.Equal(t, m3.Pack.Images[0].Chunks[0].Stored+m3.Pack.Images[0].Chunks[1].Stored, m3.Pack.Written)
	require.NoError(t, Prune(dir, 1, t0.Add(-time.Hour)))
	require.ElementsMatch(t, packFiles(m3), chunkFiles(t, dir))
	got, err := readAllImage(r3, "pages-1.img")
	require.NoError(t, err)
	require.Equal(t, changed, got)
}

// TestPackStopsWithContext: the writer's context (Within, the dump's deadline) stops the pack;
// the abort leaves no pack file.
func TestPackStopsWithContext(t *testing.T) {
	dir := t.TempDir()
	w, err := Begin(dir, NewID(time.Now()))
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	w.Within(ctx)
	sink, err := w.Pack(testRing(t), "ns1", PackOptions{})
	require.NoError(t, err)
	wc, err := sink.Create("pages-1.img")
	require.NoError(t, err)
	_, err = wc.Write(randomHeap(1<<20, 1))
	require.NoError(t, err)
	cancel()
	_, err = wc.Write(randomHeap(1<<20, 2))
	require.ErrorIs(t, err, context.Canceled)
	require.ErrorIs(t, wc.Close(), context.Canceled)
	require.ErrorIs(t, w.Commit(&Manifest{Pod: agentapi.PodRef{Namespace: "ns1"}}), context.Canceled)
	_, err = w.Abort(false)
	require.NoError(t, err)
	require.Empty(t, chunkFiles(t, dir))
}

// TestPackRemoveCompleteSweeps: when the app exits 0 its checkpoints are consumed, chunks too.
func TestPackRemoveCompleteSweeps(t *testing.T) {
	dir := t.TempDir()
	t0 := time.Now().Add(-time.Hour)
	for i := range 2 {
		_, err := packCheckpoint(t, dir, t0.Add(time.Duration(i)*time.Minute), PackOptions{}, map[string][]byte{"pages-1.img": randomHeap(1<<20, uint64(i))})
		require.NoError(t, err)
	}
	require.NotEmpty(t, chunkFiles(t, dir))
	d, err := os.Open(dir)
	require.NoError(t, err)
	defer d.Close()
	n, err := RemoveCompleteAt(d)
	require.NoError(t, err)
	require.Equal(t, 2, n)
	require.Empty(t, chunkFiles(t, dir))
}
